# apictimer: the local APIC timer (xAPIC MMIO at 0xFEE00000) in one-shot and periodic mode.
#
# In long mode (long64.inc), with an IDT handler for vector 0x40 that counts interrupts
# and writes EOI, and one for the spurious vector 0xFF. The APIC is software-enabled
# (SVR = 0x1FF), TPR = 0, divide configuration = 16. A wait polls with `sti; pause` until
# the first interrupt of a mode has arrived, then sleeps in `sti; hlt` while the current
# count is non-zero (the timer has proven it delivers, and an interrupt is due); every
# wait is bounded by the TSC (about 2^32 cycles), so a timer that never interrupts or
# does not reload ends in a failure status rather than a hang. Checks, in order
# (statuses on failure in brackets):
#   the version register says integrated APIC (0x1X)                                [0x80]
#   one-shot, initial count 0x20000: the current count reads in (0, initial] [0x81], then
#     decreases [0x82]; one interrupt arrives [0x83]; the current count is then 0 [0x84];
#     no second interrupt arrives within as long again [0x85]
#   periodic, initial count 0x8000: 5 interrupts arrive [0x86] and the current count
#     still reads in (0, initial] (reloaded) [0x87]
#   no spurious-vector interrupt was taken [0x88]
# A test should expect:
#     apictimer: one-shot ok
#     apictimer: periodic ok
#     apictimer ok
# and status 0; on a mismatch "fail: status <s> value <what was seen>" and status s.

.include "common.inc"
.include "long64.inc"

.equ APIC_BASE,      0xFEE00000
.equ APIC_VERSION,   0x030
.equ APIC_TPR,       0x080
.equ APIC_EOI,       0x0B0
.equ APIC_SVR,       0x0F0
.equ APIC_LVT_TIMER, 0x320
.equ APIC_TIMER_ICR, 0x380
.equ APIC_TIMER_CCR, 0x390
.equ APIC_TIMER_DCR, 0x3E0
.equ LVT_MASKED,     1 << 16
.equ LVT_PERIODIC,   1 << 17
.equ TIMER_VECTOR,   0x40
.equ SPURIOUS_VECTOR, 0xFF
.equ ONESHOT_COUNT,  0x20000
.equ PERIODIC_COUNT, 0x8000
.equ PERIODIC_TICKS, 5
.equ WAIT_BUDGET_SHIFT, 32              # TSC cycles a wait may take: 2^32

    .text
    .code64
    .globl main64
main64:
    movl $TIMER_VECTOR, %edi
    leaq timer_handler(%rip), %rsi
    movl $0x8E, %edx
    call set_gate
    movl $SPURIOUS_VECTOR, %edi
    leaq spurious_handler(%rip), %rsi
    call set_gate

    movl $APIC_BASE, %esi               # zero-extended: the identity map covers it
    movl APIC_VERSION(%rsi), %eax
    andl $0xF0, %eax
    EXPECT %rax, $0x10, 0x80
    movl $0, APIC_TPR(%rsi)
    movl $0x100 | SPURIOUS_VECTOR, APIC_SVR(%rsi)
    movl $0x3, APIC_TIMER_DCR(%rsi)     # divide by 16

# --- one-shot ---
    movl $TIMER_VECTOR, APIC_LVT_TIMER(%rsi)
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r12                     # R12 = TSC when armed
    movl $ONESHOT_COUNT, APIC_TIMER_ICR(%rsi)
    movl APIC_TIMER_CCR(%rsi), %ebx
    testl %ebx, %ebx
    jz 1f
    cmpl $ONESHOT_COUNT, %ebx
    jbe 2f
1:  movq %rbx, %rax
    movb $0x81, %dl
    jmp fail64
2:                                      # read again until it changes (bounded)
3:  movl APIC_TIMER_CCR(%rsi), %ecx
    cmpl %ebx, %ecx
    jne 4f
    call tsc_since_r12
    shrq $WAIT_BUDGET_SHIFT, %rax
    jz 3b
4:  cmpl %ebx, %ecx
    jb 5f
    movq %rcx, %rax
    movb $0x82, %dl
    jmp fail64
5:  movl $1, %edi
    movb $0x83, %dl
    call wait_ticks
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r13                     # R13 = TSC when the interrupt was seen
    movl APIC_TIMER_CCR(%rsi), %eax
    EXPECT %rax, $0, 0x84
    movq %r13, %r14                     # wait as long again: no second interrupt
    subq %r12, %r14
6:  sti
    pause
    cli
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r13, %rax
    cmpq %r14, %rax
    jb 6b
    EXPECT ticks(%rip), $1, 0x85
    PRINT oneshot_msg

# --- periodic ---
    movq $0, ticks(%rip)
    movl $TIMER_VECTOR | LVT_PERIODIC, APIC_LVT_TIMER(%rsi)
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r12
    movl $PERIODIC_COUNT, APIC_TIMER_ICR(%rsi)
    movl $PERIODIC_TICKS, %edi
    movb $0x86, %dl
    call wait_ticks
    movl APIC_TIMER_CCR(%rsi), %ebx
    testl %ebx, %ebx
    jz 1f
    cmpl $PERIODIC_COUNT, %ebx
    jbe 2f
1:  movq %rbx, %rax
    movb $0x87, %dl
    jmp fail64
2:  movl $TIMER_VECTOR | LVT_MASKED, APIC_LVT_TIMER(%rsi)
    movl $0, APIC_TIMER_ICR(%rsi)       # stop it
    PRINT periodic_msg

    EXPECT spurious(%rip), $0, 0x88
    PRINT ok_msg
    movb $EXIT_OK, %al
    ret

# tsc_since_r12: RAX = TSC - R12. Clobbers RDX.
tsc_since_r12:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r12, %rax
    ret

# wait_ticks: wait until ticks >= EDI, starting from TSC R12; past the budget fail with
# status DL (value = ticks). RSI = APIC base. Returns with interrupts off.
wait_ticks:
    pushq %rcx
    pushq %rdx
1:  cli
    movq ticks(%rip), %rax
    cmpq %rdi, %rax
    jae 9f
    call tsc_since_r12
    shrq $WAIT_BUDGET_SHIFT, %rax
    jnz 8f
    cmpq $0, ticks(%rip)
    je 2f                               # none yet: delivery is unproven, poll
    movl APIC_TIMER_CCR(%rsi), %eax
    testl %eax, %eax
    jz 2f                               # count ran out: the interrupt may be on its way
    sti                                 # an interrupt is due: the sti shadow covers hlt
    hlt
    jmp 1b
2:  sti
    pause
    jmp 1b
8:  popq %rdx
    movq ticks(%rip), %rax
    jmp fail64
9:  popq %rdx
    popq %rcx
    ret

timer_handler:
    pushq %rax
    incq ticks(%rip)
    movl $APIC_BASE, %eax
    movl $0, APIC_EOI(%rax)
    popq %rax
    iretq

spurious_handler:                       # no EOI for the spurious vector
    incq spurious(%rip)
    iretq

    .section .rodata
oneshot_msg:  .asciz "apictimer: one-shot ok\n"
periodic_msg: .asciz "apictimer: periodic ok\n"
ok_msg:       .asciz "apictimer ok\n"

    .data
    .balign 8
ticks:    .quad 0
spurious: .quad 0
