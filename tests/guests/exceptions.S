# exceptions: exception and software-interrupt delivery through a 64-bit IDT.
#
# Enters long mode (long64.inc: identity-mapped 4 GiB, 64-bit GDT, IDT for vectors 0-31)
# and checks that the guest's handler runs with the right vector, error code, CR2 and
# return RIP for, in order (statuses on failure in brackets):
#   #UD from ud2: vector 6, error 0, RIP of the ud2, CS = 0x08                     [0x40-0x43]
#   #GP from `mov %eax, %ds` with selector 0x48 (past the GDT limit): error 0x48,
#       RIP of the mov; then from a load at non-canonical 0x8000000000000000: error 0 [0x44-0x4A]
#   #PF from a write to 0x3FE00918, whose 2 MiB page is not present: error 0x2 (write,
#       not present); the handler maps it read-only to physical 0x400000, the write
#       faults again with error 0x3 (write, present; CR0.WP is on), the handler makes it
#       writable and the write completes: CR2 both times, RIP of the write, and the value
#       is at physical 0x400918                                                      [0x4B-0x52]
#   #DE from `div` by zero: vector 0, RIP of the div                                [0x53-0x55]
#   #BP from int3: vector 3, return RIP after the int3                               [0x56-0x58]
#   `int $0x80` (DPL 0 gate): the handler turns RAX = 0x1234 into 3 * RAX + 0x80,
#       RBX is kept, return RIP after the int                                       [0x59-0x5C]
# An exception the checks do not expect, repeated, ends with 0x19 (value = its vector).
# On KVM on a PVM host, int3 and `int $0x80` at CPL0 need pyvmm's fallback to the interpreter.
# A test should expect:
#     exc: ud ok
#     exc: gp ok
#     exc: pf ok
#     exc: de ok
#     exc: bp ok
#     exc: int80 ok
#     exceptions ok
# and status 0; on a mismatch "fail: status <s> value <what was seen>" and status s.

.include "common.inc"
.include "long64.inc"

.equ PF_PAGE,     0x3FE00000            # a 2 MiB page the guest leaves unmapped
.equ PF_PD_INDEX, PF_PAGE >> 21
.equ PF_OFFSET,   0x918
.equ PF_PHYS,     0x400000              # where the handler maps it

    .text
    .code64
    .globl main64
main64:
    movq $0, page_directories + 8 * PF_PD_INDEX(%rip)
    movl $PF_PAGE, %eax
    invlpg (%rax)
    leaq exception_hook(%rip), %rax
    movq %rax, exc_hook(%rip)
    movl $0x80, %edi
    leaq int80_handler(%rip), %rsi
    movl $0x8E, %edx
    call set_gate

# --- #UD ---
    call exc_clear
    leaq 1f(%rip), %rax
    movq %rax, exc_resume(%rip)
ud_insn:
    ud2
1:  EXPECT exc_vector(%rip), $6, 0x40
    EXPECT exc_error(%rip), $0, 0x41
    leaq ud_insn(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x42
    EXPECT exc_cs(%rip), $KCODE, 0x43
    PRINT ud_msg

# --- #GP: bad selector, then a non-canonical address ---
    call exc_clear
    leaq 1f(%rip), %rax
    movq %rax, exc_resume(%rip)
    movl $0x48, %eax
gp_selector_insn:
    movl %eax, %ds
1:  EXPECT exc_vector(%rip), $13, 0x44
    EXPECT exc_error(%rip), $0x48, 0x45
    leaq gp_selector_insn(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x46
    call exc_clear
    leaq 1f(%rip), %rax
    movq %rax, exc_resume(%rip)
    movabsq $0x8000000000000000, %rbx
gp_canonical_insn:
    movq (%rbx), %rcx
1:  EXPECT exc_vector(%rip), $13, 0x47
    EXPECT exc_error(%rip), $0, 0x48
    leaq gp_canonical_insn(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x49
    EXPECT exc_count(%rip), $1, 0x4A
    PRINT gp_msg

# --- #PF: not present, then read-only, then the write completes ---
    call exc_clear
    movabsq $0x1122334455667788, %rcx
pf_insn:
    movq %rcx, PF_PAGE + PF_OFFSET
    EXPECT exc_count(%rip), $2, 0x4B
    EXPECT pf_errors(%rip), $0x2, 0x4C
    EXPECT pf_errors+8(%rip), $0x3, 0x4D
    EXPECT pf_cr2s(%rip), $PF_PAGE+PF_OFFSET, 0x4E
    EXPECT pf_cr2s+8(%rip), $PF_PAGE+PF_OFFSET, 0x4F
    leaq pf_insn(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x50
    EXPECT exc_vector(%rip), $14, 0x51
    movl $PF_PHYS + PF_OFFSET, %ebx
    EXPECT (%rbx), %rcx, 0x52
    PRINT pf_msg

# --- #DE ---
    call exc_clear
    leaq 1f(%rip), %rax
    movq %rax, exc_resume(%rip)
    movl $1, %eax
    xorl %edx, %edx
    xorl %ecx, %ecx
de_insn:
    divl %ecx
1:  EXPECT exc_vector(%rip), $0, 0x53
    EXPECT exc_count(%rip), $1, 0x54
    leaq de_insn(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x55
    PRINT de_msg

# --- #BP: a trap, so the return RIP is the next instruction ---
    call exc_clear
bp_insn:
    int3
bp_after:
    EXPECT exc_vector(%rip), $3, 0x56
    EXPECT exc_count(%rip), $1, 0x57
    leaq bp_after(%rip), %rbx
    EXPECT exc_rip(%rip), %rbx, 0x58
    PRINT bp_msg

# --- int $0x80 ---
    movq $0x1234, %rax
    movq $0x5555, %rbx
    int $0x80
int80_after:
    movq %rax, %rcx
    EXPECT %rcx, $0x1234*3+0x80, 0x59
    EXPECT %rbx, $0x5555, 0x5A
    EXPECT int80_count(%rip), $1, 0x5B
    leaq int80_after(%rip), %rbx
    EXPECT int80_rip(%rip), %rbx, 0x5C
    PRINT int80_msg

    PRINT ok_msg
    movb $EXIT_OK, %al
    ret

# exception_hook (exc_common's hook): on #PF, record the error code and CR2, and map the
# page: read-only the first time, writable the second.
exception_hook:
    cmpq $14, %rdi
    jne 9f
    movq exc_count(%rip), %rax
    cmpq $2, %rax
    ja 9f
    leaq pf_errors - 8(%rip), %rcx
    movq exc_error(%rip), %rdx
    movq %rdx, (%rcx,%rax,8)
    leaq pf_cr2s - 8(%rip), %rcx
    movq exc_cr2(%rip), %rdx
    movq %rdx, (%rcx,%rax,8)
    movq $PF_PHYS + PTE_P + PTE_PS, %rdx
    cmpq $1, %rax
    je 1f
    orq $PTE_RW, %rdx
1:  movq %rdx, page_directories + 8 * PF_PD_INDEX(%rip)
    movl $PF_PAGE, %eax
    invlpg (%rax)
9:  ret

int80_handler:
    incq int80_count(%rip)
    pushq %rbx
    movq 8(%rsp), %rbx                  # return RIP
    movq %rbx, int80_rip(%rip)
    popq %rbx
    leaq 0x80(%rax,%rax,2), %rax
    iretq

    .section .rodata
ud_msg:    .asciz "exc: ud ok\n"
gp_msg:    .asciz "exc: gp ok\n"
pf_msg:    .asciz "exc: pf ok\n"
de_msg:    .asciz "exc: de ok\n"
bp_msg:    .asciz "exc: bp ok\n"
int80_msg: .asciz "exc: int80 ok\n"
ok_msg:    .asciz "exceptions ok\n"

    .data
    .balign 8
pf_errors:   .quad -1, -1
pf_cr2s:     .quad 0, 0
int80_count: .quad 0
int80_rip:   .quad 0
