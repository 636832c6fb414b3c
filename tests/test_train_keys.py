"""Rules every optional training key follows, checked for each (cxr.config):
- a key added after the committed models were trained (RECORDED_WHEN_ON) is off in params.yaml
  and recorded in a run's params only when on, so runs without it keep their bytes;
- a key whose work is done on this process's part of the batch refuses several processes.
A new key of either kind goes in the tables below; the first test fails until it is there.

Checked by hand (session 26): with recorded_params keeping the keys left off, with `mixup`
renamed in RECORDED_WHEN_ON, and with the logit penalty's row dropped from
TrainParams.validate's one-process table, this file went red.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from cxr.config import RECORDED_WHEN_ON, recorded_params
from cxr.params import ParamsError
from tests.conftest import NO_AUG, repo_params, toy_params

# A value that switches each RECORDED_WHEN_ON key on (toy_params trains 2 epochs).
ON: dict[str, Any] = {
    "average_epochs": 2,
    "mixstyle": 0.5,
    "mixup": 0.2,
    "logit_penalty": 0.1,
    "jtt_epochs": 1,
    "augment.jpeg": 0.5,
}
# The keys that run in one process only, with a value that switches each on.
ONE_PROCESS: dict[str, Any] = {
    "balance": "group_dro",
    "adversary": 1.0,
    "mixstyle": 0.5,
    "mixup": 0.2,
    "logit_penalty": 0.1,
    "jtt_epochs": 1,
}


def with_key(key: str, value: Any) -> Any:
    """toy_params with one key (dotted: inside `augment`) set."""
    if key.startswith("augment."):
        return toy_params(augment=NO_AUG | {key.split(".", 1)[1]: value})
    return toy_params(**{key: value})


def lookup(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def test_every_later_key_has_an_on_value_here():
    assert set(ON) == set(RECORDED_WHEN_ON)


@pytest.mark.parametrize("key", sorted(RECORDED_WHEN_ON))
def test_a_later_key_is_off_by_default_and_recorded_only_when_on(key):
    off = RECORDED_WHEN_ON[key]
    for task in ("train_binary", "train_four_class"):
        assert lookup(asdict(repo_params(task)), key) == off  # params.yaml: off
    *parents, last = key.split(".")
    plain = recorded_params(with_key(key, off))
    assert last not in (lookup(plain, ".".join(parents)) if parents else plain)
    assert lookup(recorded_params(with_key(key, ON[key])), key) == ON[key]


@pytest.mark.parametrize("key", sorted(ONE_PROCESS))
def test_a_key_of_one_process_refuses_several(key):
    value = ONE_PROCESS[key]
    with_key(key, value).validate()  # on, in one process: fine
    with pytest.raises(ParamsError, match=rf"{key}: .* runs in one process"):
        toy_params(**{key: value, "processes": 2}).validate()
