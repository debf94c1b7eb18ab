"""Filesystem layer: tree copies, disk usage, mounts and loop devices.

Modules (stdlib and ctypes only, no subprocesses):

- :mod:`.copy`: ``copy_tree``, ``copy_file``, ``copy_file_atomic``, ``reflink_supported``
- :mod:`.usage`: ``disk_usage``, ``walk_tree``, ``syncfs``
- :mod:`.flush`: ``flush_tree`` (a layer made durable before its commit), ``journal_commit``
- :mod:`.mount`: ``mount``, ``bind``, ``unmount``, ``mounts_under``,
  ``unmount_all_under``, ``is_mountpoint``, ``apply_mounts``
- :mod:`.loop`: ``attach``, ``attached``, ``detach``, ``loop_devices_for``, ``is_attached``
- :mod:`.mountopts` and :mod:`.mountinfo`: option words and the mount table

Nothing is imported here, so ``import stratasnap.fs.usage`` does not load
the ctypes mount machinery.
"""
