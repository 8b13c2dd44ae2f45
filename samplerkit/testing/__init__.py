"""Test helpers for samplerkit and its plugins.

Plugin authors run the same contract the built-ins pass::

    from samplerkit.testing import check_processor, check_sampler, temporary_plugin

    def test_my_processor_contract():
        check_processor(MyProcessor, [{"strength": 0.5}, {"strength": 2.0}])

    def test_my_backend_contract():
        check_backend(MyBackend(MyBackend.Params(...)))

    def test_my_plugin_module():
        check_plugin(my_plugin_module)      # hooks decorated and spelled right, classes accepted

    def test_registered():
        with temporary_plugin(my_plugin_module, "my_plugin") as registry:
            assert registry.has("processor", "my_processor")

Whether a whole pipeline draws what it claims (``samplerkit verify``, docs/verify.md)::

    report = verify(samplerkit.load_pipeline("run.yaml"))
    assert report.passed, report

Or over every class a registry holds (built-ins and installed plugins)::

    @parametrize_registered("processor")
    def test_contract(cls):
        check_processor(cls)
"""

from samplerkit.testing.backend_contract import check_backend
from samplerkit.testing.contract import (
    BUILTIN_EXAMPLES,
    check_distribution,
    check_plugin,
    check_processor,
    check_sampler,
    check_step,
    examples_for,
    parametrize_registered,
    registered_classes,
    temporary_plugin,
)
from samplerkit.testing.verification import VerifyReport, verify

#: Built-in pipelines that together take every fast path of a sampling step (candidate lists,
#: deferred temperature, greedy rows, thresholds handed to the sampler, the histograms, a
#: truncation followed by a monotone step). The sync-free tests on CPU and the CUDA check
#: (benchmarks/check_cuda.py) both run them.
FAST_PATH_CHAINS = [
    [{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}],
    [{"temperature": 0.7}, {"top_p": 0.9}],
    [{"min_p": 0.05}],
    [{"top_k": 40}, {"temperature": 0.0}],
    [{"top_p": 0.8}, {"min_p": 0.1}, {"temperature": 1.3}],
    [{"temperature": 1.5}, {"top_k": 1}],
    [{"temperature": 0.7}, {"typical_p": 0.9}],
    [{"top_n_sigma": 1.5}, {"temperature": 0.8}],
]

__all__ = [
    "BUILTIN_EXAMPLES", "FAST_PATH_CHAINS", "check_backend", "check_distribution", "check_plugin", "check_processor",
    "check_sampler", "check_step", "examples_for",
    "parametrize_registered", "registered_classes", "temporary_plugin", "VerifyReport", "verify",
]
