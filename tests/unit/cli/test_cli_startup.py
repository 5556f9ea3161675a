import logging

import tuneforge.cli  # noqa: F401 - installs the start-up log filters


def test_bitsandbytes_kernel_hub_warning_is_dropped_and_its_other_warnings_are_kept(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
