"""Checkpoint, restore and reset of the cell namespace (docs/protocol.md section 6).

Imported lazily on the first checkpoint/restore/reset: pickle and hashlib cost start-up time.

Blob: ``b"CAPSULE-CKPT\\x00" + u16 BE version + sha256(payload) + payload`` where the payload is
a pickle of ``{"format": 1, "python": "3.x.y", "entries": [(name, kind, data), ...]}``:

* ``("module", "os.path")``: re-imported by name (covers ``import x as y`` aliases);
* ``("source", (source, defined_name, order))``: a function or class defined in a cell, captured
  from the cell's source and re-executed on restore;
* ``("value", pickle_bytes)``: any other value, pickled on its own so that one bad name never
  spoils the rest and so that classes can be re-created before their instances are unpickled.

Because the namespace *is* ``__main__.__dict__``, instances of cell classes pickle by reference
to ``__main__.<Class>`` and unpickle once the class source has been re-executed.
"""

import hashlib
import pickle
import sys

from capsule_worker.runtime import (PyCF_ALLOW_TOP_LEVEL_AWAIT, PyCF_ONLY_AST, is_engine_key)

MAGIC = b"CAPSULE-CKPT\x00"
VERSION = 1
PICKLE_PROTOCOL = 4  # readable by every supported interpreter (3.9-3.13)

_ModuleType = type(sys)
_FunctionType = type(lambda: None)


def _user_items(ns):
    for name, value in list(ns.items()):
        if is_engine_key(name) or (name.startswith("__") and name.endswith("__")):
            continue
        yield name, value


def _defined_in_cell(v):
    if isinstance(v, _FunctionType):
        return v.__code__.co_filename.startswith("<cell-")
    if isinstance(v, type):
        return getattr(v, "__module__", None) == "__main__"
    return False


def _parse(source, filename):
    return compile(source, filename, "exec", PyCF_ONLY_AST | PyCF_ALLOW_TOP_LEVEL_AWAIT,
                   dont_inherit=True)


def _segment(lines, node):
    start = node.lineno
    for d in getattr(node, "decorator_list", ()):
        start = min(start, d.lineno)
    end = getattr(node, "end_lineno", None) or node.lineno
    return start, "".join(lines[start - 1:end])


def _find_in_cell(worker, filename, kinds, name, firstlineno, assigned_name):
    """Source of the last top-level definition of `name` in one cell (or None)."""
    import _ast
    source = worker.cell_sources.get(filename)
    if source is None:
        return None
    try:
        tree = _parse(source, filename)
    except SyntaxError:
        return None
    lines = source.splitlines(True)
    found = None
    for node in tree.body:
        if isinstance(node, kinds) and node.name == name:
            start, text = _segment(lines, node)
            if firstlineno is None or firstlineno in (start, node.lineno):
                found = text
        elif (name == "<lambda>" and isinstance(node, _ast.Assign) and firstlineno is not None
              and node.lineno <= firstlineno <= (node.end_lineno or node.lineno)
              and any(isinstance(t, _ast.Name) and t.id == assigned_name for t in node.targets)):
            found = _segment(lines, node)[1]
    return found


def _capture_source(worker, name, v):
    """(source, defined_name, order) for a cell function or class, else raise ValueError."""
    import _ast
    if "<locals>" in getattr(v, "__qualname__", ""):
        raise ValueError("defined inside another function (closure); cannot capture its source")
    order = worker.cell_order
    if isinstance(v, _FunctionType):
        fn = v.__code__.co_filename
        kinds = (_ast.FunctionDef, _ast.AsyncFunctionDef)
        text = _find_in_cell(worker, fn, kinds, v.__name__, v.__code__.co_firstlineno, name)
        if text is None:
            raise ValueError("source of function %s not found in %s" % (v.__name__, fn))
        return text, (name if v.__name__ == "<lambda>" else v.__name__), (order.get(fn, 0), v.__code__.co_firstlineno)
    # A class: look where its methods were compiled, else search cells newest first.
    kinds = (_ast.ClassDef,)
    files = []
    for attr in vars(v).values():
        code = getattr(attr, "__code__", None) or getattr(getattr(attr, "__func__", None), "__code__", None)
        if code is not None and code.co_filename.startswith("<cell-") and code.co_filename not in files:
            files.append(code.co_filename)
    first = getattr(v, "__firstlineno__", None)  # 3.13+
    others = sorted(worker.cell_sources, key=lambda f: order.get(f, 0), reverse=True)
    for fn in files + [f for f in others if f not in files]:
        text = _find_in_cell(worker, fn, kinds, v.__name__, first if fn in files else None, name)
        if text is not None:
            return text, v.__name__, (order.get(fn, 0), first or 0)
    raise ValueError("source of class %s not found in any cell" % v.__name__)


def take(worker, msg):
    req = msg.get("req", "")
    try:
        blob, names, skipped = snapshot(worker)
    except Exception as e:
        worker.send({"type": "checkpoint_failed", "req": req, "message": "%s: %s" % (type(e).__name__, e)})
        return
    worker.drain(False)
    header = {"type": "checkpoint_done", "req": req, "names": names, "skipped": skipped}
    if len(blob) + 4096 > worker.max_frame:
        worker.send({"type": "checkpoint_failed", "req": req,
                     "message": "checkpoint of %d bytes exceeds the frame limit of %d bytes" % (len(blob), worker.max_frame)})
        return
    worker.send(header, blob)


def snapshot(worker):
    """Build the blob: (bytes, captured names, skipped [{name, reason}])."""
    entries = []
    names = []
    skipped = []
    for name, v in _user_items(worker.ns):
        try:
            if isinstance(v, _ModuleType):
                entries.append((name, "module", v.__name__))
            elif _defined_in_cell(v):
                entries.append((name, "source", _capture_source(worker, name, v)))
            else:
                entries.append((name, "value", pickle.dumps(v, PICKLE_PROTOCOL)))
            names.append(name)
        except Exception as e:
            skipped.append({"name": name, "reason": str(e) or type(e).__name__})
    payload = pickle.dumps({"format": VERSION, "python": sys.version.split()[0], "entries": entries},
                           PICKLE_PROTOCOL)
    blob = MAGIC + VERSION.to_bytes(2, "big") + hashlib.sha256(payload).digest() + payload
    return blob, names, skipped


def verify(blob):
    """Return the payload dict or raise ValueError saying what is wrong."""
    head = len(MAGIC) + 2 + 32
    if len(blob) < head:
        raise ValueError("checkpoint blob too short (%d bytes)" % len(blob))
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError("not a Capsule checkpoint (bad magic)")
    version = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 2], "big")
    if version != VERSION:
        raise ValueError("unsupported checkpoint format version %d (this worker reads %d)" % (version, VERSION))
    digest = blob[len(MAGIC) + 2:head]
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checkpoint checksum mismatch (corrupted or truncated blob)")
    data = pickle.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError("checkpoint payload has no entries")
    return data


def restore(worker, msg, body):
    req = msg.get("req", "")
    try:
        data = verify(body)
    except Exception as e:
        worker.send({"type": "restore_done", "req": req, "restored": [], "error": str(e)})
        return
    if msg.get("clear", True):
        worker.clear_user_names()
    restored, errors = apply_entries(worker, data["entries"])
    worker.drain(False)
    error = None
    if errors:
        error = "could not restore: " + "; ".join("%s (%s)" % (n, r) for n, r in errors)
    worker.send({"type": "restore_done", "req": req, "restored": restored, "error": error})


def apply_entries(worker, entries):
    """Modules first, then cell sources and pickled values, repeated until no progress so
    that a class is defined before its instances and a decorator before its users."""
    ns = worker.ns
    restored = []
    errors = {}
    todo = []
    for entry in entries:
        try:
            name, kind, data = entry
        except (TypeError, ValueError):
            continue
        if kind == "module":
            try:
                __import__(data)
                ns[name] = sys.modules[data]
                restored.append(name)
            except BaseException as e:
                errors[name] = "%s: %s" % (type(e).__name__, e)
        else:
            todo.append((name, kind, data))
    todo.sort(key=lambda e: (0, e[2][2]) if e[1] == "source" else (1, (0, 0)))
    while todo:
        progress = False
        left = []
        for name, kind, data in todo:
            try:
                if kind == "source":
                    source, defined, _ = data
                    worker.cell_serial += 1
                    filename = "<cell-r%d>" % worker.cell_serial
                    worker.register_source(filename, source)
                    exec(compile(source, filename, "exec", dont_inherit=True), ns)
                    if defined != name and defined in ns:
                        ns[name] = ns[defined]
                else:
                    ns[name] = pickle.loads(data)
                restored.append(name)
                errors.pop(name, None)
                progress = True
            except BaseException as e:
                errors[name] = "%s: %s" % (type(e).__name__, e)
                left.append((name, kind, data))
        if not progress:
            break
        todo = left
    return restored, sorted(errors.items())


def reset(worker, msg):
    """Back to a fresh namespace (pool reuse): user names, history, cell sources, tasks."""
    req = msg.get("req", "")
    worker.clear_user_names()
    for k in list(worker.ns):
        if k.startswith("_") and (k[1:].isdigit() or (k.startswith("_i") and k[2:].isdigit())):
            del worker.ns[k]
    worker.init_history()
    lc = worker.linecache
    for fn in list(worker.cell_sources):
        if lc is not None:
            lc.cache.pop(fn, None)
    worker.cell_sources.clear()
    worker.cell_order.clear()
    worker.cell_serial = 0
    for attr in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, attr):
            try:
                delattr(sys, attr)
            except AttributeError:
                pass
    loop = worker.loop
    if loop is not None and not loop.is_closed():
        import asyncio
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            try:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            except BaseException as e:
                worker.log("reset: cancelling tasks failed: %r" % (e,))
    worker.drain(False)
    worker.send({"type": "restore_done", "req": req, "restored": [], "error": None})
