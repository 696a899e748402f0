import sys, time, subprocess, statistics
sys.path.insert(0, '.')
from host import Host
P = sys.argv[1]; N = 30
def med(xs): xs=sorted(xs); return statistics.median(xs)*1000, xs[int(len(xs)*0.9)]*1000
base=[]
for _ in range(N):
    t=time.perf_counter(); subprocess.run([P,'-I','-S','-c','pass']); base.append(time.perf_counter()-t)
hello=[]; first=[]
for _ in range(N):
    t=time.perf_counter(); h=Host(python=P, handshake=False); h.recv(); hello.append(time.perf_counter()-t)
    h.send({"type":"hello_ack","version":1,"encoding":"json","settings":{"output_chunk":262144,"max_frame":16777216,"enable_site":True,"sys_path":[]}})
    h.run("x = 1"); first.append(time.perf_counter()-t); h.close()
b=med(base); a=med(hello); c=med(first)
print("%s: pass %.1f ms (p90 %.1f) | spawn->hello %.1f ms (p90 %.1f) ratio %.2f | spawn->first outcome (site + x=1) %.1f ms (p90 %.1f)" % (P, b[0], b[1], a[0], a[1], a[0]/b[0], c[0], c[1]))
