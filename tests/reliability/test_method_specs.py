"""Method specs parse strictly, and a parameter listed twice in one group is refused: a loose
spec or a doubled parameter would train something else than was asked, silently."""

from __future__ import annotations

import pytest
import torch

from flatlm import cli
from flatlm.optim import create, parse_method


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sam:rho=1,rho=2", "option 'rho' is given twice in 'sam:rho=1,rho=2'"),
        ("sam:", "'sam:' has a ':' but no options"),
        ("sam:rho=1,", "bad method option '' in 'sam:rho=1,'"),
    ],
)
def test_a_loose_method_spec_is_refused(spec, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--method", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["adamw", "sam", "fsam", "gasam"])
def test_a_parameter_listed_twice_in_one_group_is_refused(method):
    w = torch.nn.Parameter(torch.ones(3, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(
        ValueError, match=r"param_groups\[1\] lists a parameter of shape \(3, 2\) twice"
    ):
        create(method, [{"params": [b]}, {"params": [w, b.new_zeros(1).requires_grad_(), w]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\] lists a parameter of shape \(2,\)"):
        create(method, [w, b, b])
    create(method, [w, b])  # each once: fine
