# pio: port-I/O round trips.
#
# Checks, in order (status on failure in brackets):
#   UART scratch register 0x3FF: write then read back 0x00 0x55 0xAA 0xFF 0x5A 0xA5  [0x21]
#   `rep outsb` of 11 22 33 44 to 0x3FF leaves 0x44 in it                          [0x22]
#   `rep insb` of 3 bytes from 0x3FF reads 44 44 44                                  [0x23]
#   an unmapped port (0x2F0) reads as all-ones: inb 0xFF [0x24], inw 0xFFFF [0x25],
#   inl 0xFFFFFFFF [0x26]
#   CMOS 0x34/0x35 (RAM above 16 MiB, below 4 GiB, in 64 KiB units) read through 0x70/0x71
# A test should expect:
#     cmos: <byte 0x35 * 256 + byte 0x34, 0x-hex>
#     pio ok
# and status 0; on a mismatch "fail: status 0x2N value <what was read>" and status 0x2N.

.include "common.inc"

.equ UNMAPPED_PORT, 0x2F0

    .text
    .globl main
main:
    movl $scratch_values, %ebx
    movl $scratch_values_end - scratch_values, %ecx
    movw $COM1_SCR, %dx
1:  movb (%ebx), %al
    outb %al, %dx
    xorl %eax, %eax
    inb %dx, %al
    cmpb (%ebx), %al
    jne scratch_mismatch
    incl %ebx
    loop 1b

    movl $outs_bytes, %esi      # string output: each byte lands in the same register
    movl $4, %ecx
    rep outsb
    xorl %eax, %eax
    inb %dx, %al
    cmpb $0x44, %al
    movb $0x22, %dl
    jne mismatch
    movw $COM1_SCR, %dx

    movl $ins_buffer, %edi      # string input: every byte reads the register
    movl $3, %ecx
    rep insb
    movl ins_buffer, %eax
    andl $0x00FFFFFF, %eax
    cmpl $0x00444444, %eax
    movb $0x23, %dl
    jne mismatch

    movw $UNMAPPED_PORT, %dx
    xorl %eax, %eax
    inb %dx, %al
    cmpl $0xFF, %eax
    movb $0x24, %dl
    jne mismatch
    movw $UNMAPPED_PORT, %dx
    xorl %eax, %eax
    inw %dx, %ax
    cmpl $0xFFFF, %eax
    movb $0x25, %dl
    jne mismatch
    movw $UNMAPPED_PORT, %dx
    xorl %eax, %eax
    inl %dx, %eax
    cmpl $0xFFFFFFFF, %eax
    movb $0x26, %dl
    jne mismatch

    movb $0x35, %al             # CMOS: high byte first (index 0x35), NMI left enabled
    outb %al, $PORT_CMOS_INDEX
    inb $PORT_CMOS_DATA, %al
    movzbl %al, %ebx
    shll $8, %ebx
    movb $0x34, %al
    outb %al, $PORT_CMOS_INDEX
    inb $PORT_CMOS_DATA, %al
    movb %al, %bl
    movl $cmos_msg, %esi
    call puts
    movl %ebx, %eax
    call put_hex
    call newline

    movl $ok_msg, %esi
    call puts
    movb $EXIT_OK, %al
    ret

scratch_mismatch:
    movb $0x21, %dl
mismatch:                       # EAX = value read, DL = status
    jmp fail

    .section .rodata
scratch_values: .byte 0x00, 0x55, 0xAA, 0xFF, 0x5A, 0xA5
scratch_values_end:
outs_bytes:     .byte 0x11, 0x22, 0x33, 0x44
cmos_msg:       .asciz "cmos: "
ok_msg:         .asciz "pio ok\n"

    .data
ins_buffer: .long 0
