# exceptions32: exception and software-interrupt delivery through a 32-bit protected-mode IDT.
#
# The 32-bit counterpart of exceptions.S, on lib.S's flat GDT with PAE paging (2 MiB pages,
# CR0.WP) identity-mapping the first 4 GiB. Checks, in order (statuses in brackets):
#   #UD from ud2: vector 6, error 0, EIP of the ud2, CS = 0x08                      [0x40-0x43]
#   #GP from `mov %eax, %ds` with selector 0x48 (past the GDT limit): error 0x48,
#       EIP of the mov                                                               [0x44-0x46]
#   #PF from a write to 0x3FE00918, whose 2 MiB page is not present: error 0x2; the
#       handler maps it read-only to physical 0x400000, the write faults again with
#       error 0x3, the handler makes it writable and the write completes: CR2 both
#       times, EIP of the write, and the value is at physical 0x400918               [0x4B-0x52]
#   #DE from `div` by zero: vector 0, EIP of the div                                [0x53-0x55]
#   #BP from int3: vector 3, return EIP after the int3                               [0x56-0x58]
#   `int $0x80` (DPL 0 gate): EAX = 0x1234 becomes 3 * EAX + 0x80, EBX is kept,
#       return EIP after the int                                                     [0x59-0x5C]
# More than 8 exceptions in one check end with 0x19 (value = the last vector).
# `paging=0` on the command line leaves paging off and prints "exc: pf skipped (paging=0)"
# instead of the #PF check.
# On KVM on a PVM host, 32-bit iret, int3 and `int $0x80` at CPL0 need pyvmm's fallback to
# the interpreter, and setting CR0.PG in 32-bit protected mode (PAE or not) raises #GP.
# A test should expect:
#     paging on                 (without paging=0)
#     exc: ud ok
#     exc: gp ok
#     exc: pf ok
#     exc: de ok
#     exc: bp ok
#     exc: int80 ok
#     exceptions32 ok
# and status 0; on a mismatch "fail: status <s> value <what was seen>" and status s.

.include "common.inc"

.equ EXIT_UNEXPECTED_EXCEPTION, 0x19
.equ PF_PAGE,     0x3FE00000            # a 2 MiB page the guest leaves unmapped
.equ PF_PD_INDEX, PF_PAGE >> 21         # in page_directories (4 x 512 entries)
.equ PF_OFFSET,   0x918
.equ PF_PHYS,     0x400000
.equ PDE_P,  1 << 0
.equ PDE_RW, 1 << 1
.equ PDE_PS, 1 << 7

# EXPECT value, expected, status: fail with status (showing value) unless value == expected.
.macro EXPECT value, expected, status
    movl \value, %eax
    cmpl \expected, %eax
    je .Lexpect_ok\@
    movb $\status, %dl
    jmp fail
.Lexpect_ok\@:
.endm

.macro PRINT label
    movl $\label, %esi
    call puts
.endm

    .text
    .code32
    .globl main
main:
    xorl %edi, %edi                     # vectors 0-31 -> exc_stubs, 0x80 -> int80_handler
    movl $exc_stubs, %esi
1:  call set_gate
    addl $16, %esi
    incl %edi
    cmpl $32, %edi
    jb 1b
    movl $0x80, %edi
    movl $int80_handler, %esi
    call set_gate
    lidt idt_desc

    movl $paging_key, %esi
    call cmdline_get
    testl %eax, %eax
    jz 2f
    movl %eax, %esi
    call parse_number
    jc 2f
    movl %eax, paging
    testl %eax, %eax
    jz checks
2:  movl $page_directories + PDE_P, %eax # PDPT[0..3] -> the four page directories
    xorl %ecx, %ecx
1:  movl %eax, pdpt(,%ecx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    movl $PDE_P + PDE_RW + PDE_PS, %eax # 2048 2 MiB pages: 0 .. 4 GiB identity
    xorl %ecx, %ecx
1:  movl %eax, page_directories(,%ecx,8)
    addl $0x200000, %eax
    incl %ecx
    cmpl $2048, %ecx
    jb 1b
    movl $0, page_directories + 8 * PF_PD_INDEX
    movl %cr4, %eax
    orl $0x20, %eax                     # PAE
    movl %eax, %cr4
    movl $pdpt, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $0x80010000, %eax               # PG | WP
paging_on:
    movl %eax, %cr0
    PRINT paging_msg

checks:

# --- #UD ---
    call exc_clear
    movl $1f, exc_resume
ud_insn:
    ud2
1:  EXPECT exc_vector, $6, 0x40
    EXPECT exc_error, $0, 0x41
    EXPECT exc_eip, $ud_insn, 0x42
    EXPECT exc_cs, $CODE_SEL, 0x43
    PRINT ud_msg

# --- #GP: a selector past the GDT limit ---
    call exc_clear
    movl $1f, exc_resume
    movl $0x48, %eax
gp_selector_insn:
    movl %eax, %ds
1:  EXPECT exc_vector, $13, 0x44
    EXPECT exc_error, $0x48, 0x45
    EXPECT exc_eip, $gp_selector_insn, 0x46
    PRINT gp_msg

# --- #PF: not present, then read-only, then the write completes ---
    cmpl $0, paging
    jne 1f
    PRINT pf_skipped_msg
    jmp de_check
1:  call exc_clear
    movl $0x11223344, %ecx
pf_insn:
    movl %ecx, PF_PAGE + PF_OFFSET
    EXPECT exc_count, $2, 0x4B
    EXPECT pf_errors, $0x2, 0x4C
    EXPECT pf_errors+4, $0x3, 0x4D
    EXPECT pf_cr2s, $PF_PAGE+PF_OFFSET, 0x4E
    EXPECT pf_cr2s+4, $PF_PAGE+PF_OFFSET, 0x4F
    EXPECT exc_eip, $pf_insn, 0x50
    EXPECT exc_vector, $14, 0x51
    EXPECT PF_PHYS+PF_OFFSET, %ecx, 0x52
    PRINT pf_msg

# --- #DE ---
de_check:
    call exc_clear
    movl $1f, exc_resume
    movl $1, %eax
    xorl %edx, %edx
    xorl %ecx, %ecx
de_insn:
    divl %ecx
1:  EXPECT exc_vector, $0, 0x53
    EXPECT exc_count, $1, 0x54
    EXPECT exc_eip, $de_insn, 0x55
    PRINT de_msg

# --- #BP: a trap, so the return EIP is the next instruction ---
    call exc_clear
bp_insn:
    int3
bp_after:
    EXPECT exc_vector, $3, 0x56
    EXPECT exc_count, $1, 0x57
    EXPECT exc_eip, $bp_after, 0x58
    PRINT bp_msg

# --- int $0x80 ---
    movl $0x1234, %eax
    movl $0x5555, %ebx
    int $0x80
int80_after:
    movl %eax, %ecx
    EXPECT %ecx, $0x1234*3+0x80, 0x59
    EXPECT %ebx, $0x5555, 0x5A
    EXPECT int80_count, $1, 0x5B
    EXPECT int80_eip, $int80_after, 0x5C
    PRINT int80_msg

    PRINT ok_msg
    movb $EXIT_OK, %al
    ret

# set_gate: IDT entry EDI -> handler ESI (32-bit interrupt gate, DPL 0, selector CODE_SEL).
set_gate:
    pushl %eax
    movl %esi, %eax
    movw %ax, idt(,%edi,8)
    movw $CODE_SEL, idt + 2(,%edi,8)
    movw $0x8E00, idt + 4(,%edi,8)
    shrl $16, %eax
    movw %ax, idt + 6(,%edi,8)
    popl %eax
    ret

    .balign 16
exc_stubs:
.irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
    .else
    pushl $0
    .endif
    pushl $\vector
    jmp exc_common
.endr

# Stack: vector, error code, EIP, CS, EFLAGS.
exc_common:
    pushal                              # 32 bytes
    movl 32(%esp), %edi
    movl %edi, exc_vector
    movl 36(%esp), %eax
    movl %eax, exc_error
    movl 40(%esp), %eax
    movl %eax, exc_eip
    movl 44(%esp), %eax
    movl %eax, exc_cs
    movl %cr2, %eax
    movl %eax, exc_cr2
    incl exc_count
    cmpl $8, exc_count
    jbe 1f
    movl %edi, %eax
    movb $EXIT_UNEXPECTED_EXCEPTION, %dl
    jmp fail
1:  cmpl $14, %edi
    jne 2f
    call page_fault
2:  movl exc_resume, %eax
    testl %eax, %eax
    jz 3f
    movl %eax, 40(%esp)
    movl $0, exc_resume
3:  popal
    addl $8, %esp
exc_iret:
    iret

# page_fault: record the error code and CR2; map the page read-only, then writable.
page_fault:
    movl exc_count, %eax
    cmpl $2, %eax
    ja 9f
    movl exc_error, %edx
    movl %edx, pf_errors - 4(,%eax,4)
    movl exc_cr2, %edx
    movl %edx, pf_cr2s - 4(,%eax,4)
    movl $PF_PHYS + PDE_P + PDE_PS, %edx
    cmpl $1, %eax
    je 1f
    orl $PDE_RW, %edx
1:  movl %edx, page_directories + 8 * PF_PD_INDEX
    invlpg PF_PAGE
9:  ret

int80_handler:
    incl int80_count
    pushl %ebx
    movl 4(%esp), %ebx                  # return EIP
    movl %ebx, int80_eip
    popl %ebx
    leal 0x80(%eax,%eax,2), %eax
    iret

exc_clear:
    movl $0, exc_count
    movl $-1, exc_vector
    movl $-1, exc_error
    movl $0, exc_eip
    ret

    .section .rodata
ud_msg:    .asciz "exc: ud ok\n"
gp_msg:    .asciz "exc: gp ok\n"
pf_msg:    .asciz "exc: pf ok\n"
pf_skipped_msg: .asciz "exc: pf skipped (paging=0)\n"
paging_key: .asciz "paging="
paging_msg: .asciz "paging on\n"
de_msg:    .asciz "exc: de ok\n"
bp_msg:    .asciz "exc: bp ok\n"
int80_msg: .asciz "exc: int80 ok\n"
ok_msg:    .asciz "exceptions32 ok\n"

    .data
    .balign 8
idt_desc:
    .word 256 * 8 - 1
    .long idt
exc_resume:  .long 0
exc_count:   .long 0
exc_vector:  .long -1
exc_error:   .long -1
exc_eip:     .long 0
exc_cs:      .long 0
exc_cr2:     .long 0
pf_errors:   .long -1, -1
pf_cr2s:     .long 0, 0
int80_count: .long 0
int80_eip:   .long 0
paging:      .long 1

    .bss
    .balign 4096
page_directories: .skip 4 * 4096        # 2 MiB page i at page_directories + 8 * i
pdpt:             .skip 32
idt:            .skip 256 * 8
