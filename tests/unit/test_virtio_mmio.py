"""virtio-mmio transport: registers, the status table, feature negotiation, queue setup rules."""

import pytest

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.status import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    TRANSITIONS,
    VIRTIO_F_VERSION_1,
    Step,
    next_step,
)
from pyvmm.vmm import layout

A, AD, ADF, ADFO = ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK


@pytest.fixture
def driver():
    return mock_guest(VirtioRng())


def test_identity_registers(driver):
    assert driver.read_reg(mmio.MAGIC) == 0x74726976
    assert driver.read_reg(mmio.VERSION_REG) == 2
    assert driver.read_reg(mmio.DEVICE_ID) == 4
    assert driver.read_reg(mmio.VENDOR) == mmio.VENDOR_ID
    assert driver.device_features() >> VIRTIO_F_VERSION_1 & 1


def test_cmdline_entry():
    base = layout.VIRTIO_MMIO_BASE + 2 * layout.VIRTIO_MMIO_SIZE
    irq = layout.virtio_irqs()[2]
    assert irq == 18  # the third of the IOAPIC-only GSIs 16-23
    assert mmio.cmdline_entry(base, irq) == "virtio_mmio.device=4K@0xd0002000:18"


def test_full_probe_sequence(driver):
    accepted = driver.setup()
    assert driver.status == ADFO
    assert driver.transport.active
    assert accepted == driver.device_features()
    driver.write_reg(mmio.QUEUE_SEL, 0)
    assert driver.read_reg(mmio.QUEUE_READY) == 1
    assert driver.read_reg(mmio.QUEUE_NUM_MAX) == 64


def test_reset_clears_everything(driver):
    driver.setup()
    driver.set_status(0)
    assert driver.status == 0
    driver.write_reg(mmio.QUEUE_SEL, 0)
    assert driver.read_reg(mmio.QUEUE_READY) == 0
    assert driver.transport.metrics()["resets"] == 1
    # Linux clears QueueReady once more after the reset while tearing queues down: harmless
    driver.write_reg(mmio.QUEUE_READY, 0)
    assert driver.status == 0


def test_features_ok_refused_without_version_1(driver):
    driver.negotiate(without=1 << VIRTIO_F_VERSION_1)
    assert driver.status == AD  # FEATURES_OK not accepted
    assert "VERSION_1" in driver.transport.last_error


def test_features_ok_refused_for_unoffered_feature(driver):
    driver.negotiate(driver.device_features() | 1 << 40)
    assert driver.status == AD
    assert "did not offer (40)" in driver.transport.last_error


def test_status_table_is_explicit():
    assert TRANSITIONS[(0, A)] is Step.ACKNOWLEDGE
    assert next_step(A, ADF) is Step.WRONG_ORDER
    assert next_step(ADFO, 0) is Step.RESET
    assert next_step(AD, AD | FAILED) is Step.FAILED
    assert next_step(ADF, ADF) is Step.UNCHANGED


@pytest.mark.parametrize(
    "sequence",
    [
        [DRIVER],  # DRIVER before ACKNOWLEDGE
        [A, ADF],  # FEATURES_OK skipping DRIVER
        [A, AD, ADFO & ~FEATURES_OK],  # DRIVER_OK without FEATURES_OK
        [A, A | DRIVER_OK],
        [A, AD, A],  # clearing a bit without reset
    ],
)
def test_wrong_status_order_needs_reset(driver, sequence):
    for value in sequence:
        driver.set_status(value)
    assert driver.status & DEVICE_NEEDS_RESET
    assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    assert "out of order" in driver.transport.last_error
    # the device keeps refusing until the driver resets it
    driver.set_status(driver.status | FEATURES_OK)
    assert driver.status & DEVICE_NEEDS_RESET
    driver.set_status(0)
    assert driver.status == 0


def test_needs_reset_is_sticky_until_the_driver_resets(driver):
    """A device in DEVICE_NEEDS_RESET must not reach DRIVER_OK by the next valid step: only a reset clears it."""
    driver.negotiate()
    driver.queues = [driver.setup_queue(i) for i in range(len(driver.transport.queues))]
    driver.write_reg(mmio.DRIVER_FEATURES, 0)  # after FEATURES_OK: a rule break
    assert driver.status & DEVICE_NEEDS_RESET
    driver.set_status(driver.status | DRIVER_OK)  # what would be the next step without the break
    assert driver.status & DEVICE_NEEDS_RESET and not driver.status & DRIVER_OK
    assert not driver.transport.active
    assert next_step(ADF | DEVICE_NEEDS_RESET, ADFO) is Step.WRONG_ORDER
    assert next_step(ADF | DEVICE_NEEDS_RESET, ADFO | DEVICE_NEEDS_RESET) is Step.WRONG_ORDER
    assert next_step(ADF | DEVICE_NEEDS_RESET, ADF | DEVICE_NEEDS_RESET) is Step.UNCHANGED
    driver.setup()  # a reset, then the whole probe again: now it works
    assert driver.transport.active and not driver.status & DEVICE_NEEDS_RESET


def test_failed_is_accepted_and_stops_the_device(driver):
    driver.setup()
    driver.set_status(ADFO | FAILED)
    assert driver.status & FAILED
    assert not driver.transport.active


def test_driver_features_after_features_ok_needs_reset(driver):
    driver.negotiate()
    driver.write_reg(mmio.DRIVER_FEATURES, 0)
    assert driver.status & DEVICE_NEEDS_RESET
    assert "DriverFeatures" in driver.transport.last_error


@pytest.mark.parametrize("register", [mmio.QUEUE_NUM, mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_HIGH, mmio.QUEUE_READY])
def test_queue_change_after_driver_ok_needs_reset(driver, register):
    driver.setup()
    driver.write_reg(mmio.QUEUE_SEL, 0)
    driver.write_reg(register, 0 if register == mmio.QUEUE_READY else 16)
    assert driver.status & DEVICE_NEEDS_RESET
    assert "only allowed after FEATURES_OK and before DRIVER_OK" in driver.transport.last_error


def test_queue_setup_before_features_ok_needs_reset(driver):
    driver.set_status(A)
    driver.set_status(AD)
    driver.write_reg(mmio.QUEUE_SEL, 0)
    driver.write_reg(mmio.QUEUE_NUM, 16)
    assert driver.status & DEVICE_NEEDS_RESET


def test_ready_queue_cannot_be_resized(driver):
    driver.negotiate()
    driver.setup_queue(0)
    driver.write_reg(mmio.QUEUE_NUM, 8)
    assert driver.status & DEVICE_NEEDS_RESET
    assert "reconfigured while ready" in driver.transport.last_error


def test_interrupt_ack_lowers_the_line(driver):
    driver.setup()
    q = driver.queues[0]
    buf = driver.alloc(8)
    q.add([(buf, 8, True)])
    assert driver.irq_levels[-1] is True
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER
    driver.write_reg(mmio.INTERRUPT_ACK, mmio.INTERRUPT_USED_BUFFER)
    assert driver.irq_levels[-1] is False
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == 0


def test_odd_width_register_access_is_harmless(driver):
    data = bytearray(2)
    driver.transport.read(mmio.MAGIC, memoryview(data))
    assert data == bytes(2)
    driver.transport.write(mmio.STATUS, b"\x01")
    assert driver.status == 0


def test_notify_before_driver_ok_is_ignored_then_served(driver):
    driver.negotiate()
    queue = driver.setup_queue(0)
    buf = driver.alloc(8)
    queue.add([(buf, 8, True)])  # kicks before DRIVER_OK
    assert queue.used_idx() == 0
    driver.set_status(ADFO)  # activation serves what was already made available
    assert queue.take_used() == [(0, 8)]


def test_config_generation_and_change_interrupt(driver):
    driver.setup()
    before = driver.read_reg(mmio.CONFIG_GENERATION)
    driver.transport.config_changed()
    assert driver.read_reg(mmio.CONFIG_GENERATION) == before + 1
    assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE


def test_device_bug_becomes_needs_reset_not_a_crash(driver):
    driver.setup()

    def broken(index):
        raise RuntimeError("bug in a device model")

    driver.transport.device.process_queue = broken
    driver.queues[0].kick()
    assert driver.status & DEVICE_NEEDS_RESET
    assert "bug in a device model" in driver.transport.last_error
