"""Test helpers for samplerkit and its plugins.

Plugin authors run the same contract the built-ins pass::

    from samplerkit.testing import check_processor, check_sampler, temporary_plugin

    def test_my_processor_contract():
        check_processor(MyProcessor, [{"strength": 0.5}, {"strength": 2.0}])

    def test_registered():
        with temporary_plugin(my_plugin_module, "my_plugin") as registry:
            assert registry.has("processor", "my_processor")

Or over every class a registry holds (built-ins and installed plugins)::

    @parametrize_registered("processor")
    def test_contract(cls):
        check_processor(cls)
"""

from samplerkit.testing.contract import (
    BUILTIN_EXAMPLES,
    check_processor,
    check_sampler,
    check_step,
    examples_for,
    parametrize_registered,
    registered_classes,
    temporary_plugin,
)

__all__ = [
    "BUILTIN_EXAMPLES", "check_processor", "check_sampler", "check_step", "examples_for",
    "parametrize_registered", "registered_classes", "temporary_plugin",
]
