"""Generates ``overlayroot/core/_syscalls_ffi.py``, the out-of-line ABI-mode cffi module.

Out-of-line ABI mode imports in about 2 ms because the declarations below are parsed here, once,
at development time; in-line mode would parse them at every boot (~50 ms). The generated module
is committed; ``python -m overlayroot.core.ffi_build`` regenerates it and a test checks it is
current.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE = "overlayroot.core._syscalls_ffi"

CDEF = """
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int reboot(int cmd);
long syscall(long number, ...);
int ioctl(int fd, unsigned long request, ...);
void sync(void);

struct loop_info64 {
    uint64_t lo_device;
    uint64_t lo_inode;
    uint64_t lo_rdevice;
    uint64_t lo_offset;
    uint64_t lo_sizelimit;
    uint32_t lo_number;
    uint32_t lo_encrypt_type;
    uint32_t lo_encrypt_key_size;
    uint32_t lo_flags;
    uint8_t lo_file_name[64];
    uint8_t lo_crypt_name[64];
    uint8_t lo_encrypt_key[32];
    uint64_t lo_init[2];
};

struct loop_config {
    uint32_t fd;
    uint32_t block_size;
    struct loop_info64 info;
    uint64_t reserved[8];
};
"""


def generate(target: Path) -> None:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, None)
    ffi.emit_python_code(str(target))


def main() -> None:
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("_syscalls_ffi.py")
    )
    generate(target)


if __name__ == "__main__":
    main()
