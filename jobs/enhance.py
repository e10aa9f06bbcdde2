"""Ray job entry point: ``hdm enhance`` on Ray Data, on the cluster this job runs in.

``hdm submit enhance SRC... -o DEST --checkpoint REF [options]`` runs this as
``python jobs/enhance.py --ray SRC... -o DEST --checkpoint REF [options]``; it can also be
given to ``ray job submit --working-dir . -- python jobs/enhance.py ...`` directly. Sources and
destination should be URIs every node reaches (``s3://...``) or paths on a shared file system.
"""

from __future__ import annotations

from hdm_platform.cli.enhance import enhance

if __name__ == "__main__":
    enhance(prog_name="jobs/enhance.py")
