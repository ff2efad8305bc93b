# hello: the smallest PVH guest, also shipped as pyvmm/guests/hello.elf for `pyvmm demo`.
#
# Checks: PVH entry, serial output, POST port, debug-exit.
# A test should expect on the serial console:
#     Hello from pyvmm guest
#     hello ok
# POST codes 0x01 (entered main) and 0x02 (printed) on port 0x80, then
# debug-exit status 0 (pyvmm boot exits 0). Does not read start_info.

.include "common.inc"

    .text
    .globl main
main:
    movb $0x01, %al
    call post
    movl $hello_msg, %esi
    call puts
    movb $0x02, %al
    call post
    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

    .section .rodata
hello_msg: .asciz "Hello from pyvmm guest\n"
ok_msg:    .asciz "hello ok\n"
