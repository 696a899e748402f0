"""Capsule worker runtime: runs Python cells for a Capsule host over fds 3 (data in),
4 (events out) and 5 (control in). See docs/protocol.md and docs/worker.md.

Standard library only. Start-up time matters: this package imports as little as possible at
start (no json/re/threading/asyncio); heavier modules are imported lazily when first needed.
"""


def main():
    """Entry point used by the bootstrap command line (`capsule_worker.main()`)."""
    from capsule_worker import runtime

    runtime.run()


def template_main():
    """Entry point of the fork-server template (`capsule_worker.template_main()`)."""
    from capsule_worker import template

    template.template_main()
