"""``value_checks`` and ``autograd_only``: a call, a reusable context manager, a decorator."""

from __future__ import annotations

import threading

import pytest

from pml_margins.functional.autograd_switch import autograd_only, autograd_only_enabled
from pml_margins.validation import value_checks, value_checks_enabled

SWITCHES = [
    (autograd_only, autograd_only_enabled, False),
    (value_checks, value_checks_enabled, True),
]


@pytest.fixture(params=SWITCHES, ids=["autograd_only", "value_checks"])
def switch(request):
    cls, read, default = request.param
    assert read() is default
    yield cls, read, default
    cls(default)  # whatever a failing test left
    assert read() is default


def test_a_call_switches_from_now_on(switch) -> None:
    cls, read, default = switch
    cls(not default)
    assert read() is (not default)
    cls(default)
    assert read() is default


def test_a_context_manager_can_be_entered_again_and_nested(switch) -> None:
    cls, read, default = switch
    ctx = cls(not default)
    with ctx:
        assert read() is (not default)
    assert read() is default
    with ctx:  # entered a second time: switches again
        assert read() is (not default)
        with cls(default):
            assert read() is default
            with ctx:  # the same object, nested
                assert read() is (not default)
            assert read() is default
        assert read() is (not default)
    assert read() is default


def test_an_exception_restores_the_setting(switch) -> None:
    cls, read, default = switch
    with pytest.raises(RuntimeError), cls(not default):
        raise RuntimeError
    assert read() is default


def test_a_decorator_switches_around_each_call_only(switch) -> None:
    cls, read, default = switch

    @cls(not default)
    def inside() -> bool:
        return read()

    assert read() is default  # decorating changed nothing
    assert inside() is (not default) and inside() is (not default)
    assert read() is default


def test_the_setting_is_per_thread(switch) -> None:
    cls, read, default = switch
    seen = []
    with cls(not default):
        worker = threading.Thread(target=lambda: seen.append(read()))
        worker.start()
        worker.join()
    assert seen == [default]


def test_enabled_must_be_a_bool(switch) -> None:
    cls, read, default = switch
    with pytest.raises(TypeError, match="enabled must be a bool"):
        cls("False")
    assert read() is default


def test_a_decorated_generator_function_runs_its_body_switched() -> None:
    """A generator's body runs after the decorated call returned: the setting is switched
    around each resume, and is the caller's between them (review: it saw False)."""
    from pml_margins import autograd_only, autograd_only_enabled

    @autograd_only()
    def seen():
        received = yield autograd_only_enabled()
        yield (received, autograd_only_enabled())
        try:
            yield "waiting"
        except KeyError:
            yield ("thrown", autograd_only_enabled())
        return "done"

    gen = seen()
    assert next(gen) is True
    assert autograd_only_enabled() is False
    assert gen.send("x") == ("x", True)
    assert next(gen) == "waiting"
    assert gen.throw(KeyError("k")) == ("thrown", True)
    try:
        next(gen)
    except StopIteration as stop:
        assert stop.value == "done"
    else:
        raise AssertionError("the generator did not finish")
    assert autograd_only_enabled() is False
    assert list(autograd_only()(lambda: (yield from range(2)))()) == [0, 1]


def test_a_decorated_generator_closed_early_runs_its_cleanup_switched() -> None:
    """``close()`` before the end resumes the body (its ``finally``) switched too (found
    by review: only a generator run to its end was checked)."""
    from pml_margins import autograd_only, autograd_only_enabled

    cleanup = []

    @autograd_only()
    def body():
        try:
            yield 1
            yield 2
        finally:
            cleanup.append(autograd_only_enabled())

    gen = body()
    assert next(gen) == 1
    gen.close()
    assert cleanup == [True]
    assert autograd_only_enabled() is False
