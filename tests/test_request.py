"""One typed request from CLI to deployment (issue 12, item 3): the CLI's `train`/`compare`
options, the flows' one parameter and the deployment form all come from the fields of
`tasks.request`, and the shortcut options meet `--set` in one place."""

from __future__ import annotations

from dataclasses import fields

import pytest

from flows.cli import build_parser
from tasks.request import CompareRequest, RunRequest, TrainRequest

TRAIN = ["train", "--model", "lenet5", "--dataset", "imagefolder"]


@pytest.mark.parametrize("cls", [TrainRequest, CompareRequest])
def test_every_option_field_is_a_cli_flag(cls: type[RunRequest]) -> None:
    command = "train" if cls is TrainRequest else "compare"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    for f in fields(cls):
        for flag in f.metadata.get("flags", ()):
            assert flag in flags, (cls.__name__, f.name)


def test_cli_builds_the_request() -> None:
    args = build_parser().parse_args(
        [*TRAIN, "--data-dir", "d", "--epochs", "2", "--lr", "0.5", "--set", "weight_decay=0",
         "--retries", "0", "--config", "c.yaml", "--no-register", "--freeze-backbone"]
    )  # fmt: skip
    req = TrainRequest.from_args(args)
    assert (req.model, req.dataset, req.data_dir, req.epochs, req.lr) == (
        "lenet5", "imagefolder", "d", 2, 0.5,
    )  # fmt: skip
    assert (req.train_retries, req.config_file, req.to_registry) == (0, "c.yaml", False)
    # The shortcut options over --set, merged in one place.
    assert req.config_overrides() == {
        "optim.weight_decay": 0, "optim.epochs": 2, "optim.lr": 0.5,
        "model.freeze_backbone": True,
    }  # fmt: skip
    plain = TrainRequest.from_args(build_parser().parse_args(TRAIN))
    assert plain == TrainRequest(model="lenet5", dataset="imagefolder")
    compare = CompareRequest.from_args(
        build_parser().parse_args(["compare", "--models", " a, b ", "--dataset", "x", "--register"])
    )
    assert compare.models == ("a", "b") and compare.to_registry
    assert compare.for_model("b") == TrainRequest(model="b", dataset="x")


def test_request_checks_its_own_values() -> None:
    with pytest.raises(ValueError, match="not both"):
        TrainRequest(recipe="default", config_file="c.yaml").check()
    with pytest.raises(ValueError, match="--retries -1"):
        TrainRequest(train_retries=-1).check()
    with pytest.raises(ValueError, match="models is empty"):
        CompareRequest(models=" , ").check()
    with pytest.raises(ValueError, match="twice"):
        CompareRequest(models="a,a").check()
    with pytest.raises(ValueError, match="--max-concurrent 0"):
        CompareRequest(max_concurrent=0).check()


def test_deployment_parameters_keep_what_differs() -> None:
    req = TrainRequest(dataset="imagefolder", epochs=2)
    assert req.parameters("model") == {"model": "lenet5", "dataset": "imagefolder", "epochs": 2}
    assert CompareRequest(models=["x"]).parameters() == {"models": ["x"]}


def test_the_flows_take_the_request_as_a_described_form() -> None:
    """Prefect's schema of the flow parameter (what the deployment UI renders): one object
    whose properties carry the fields' help; an unknown key and a bad choice are refused."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import compare_architectures, train_pipeline

    schema = parameter_schema(train_pipeline).model_dump()
    assert list(schema["properties"]) == ["request"]
    props = schema["definitions"]["TrainRequest"]["properties"]
    assert {f.name for f in fields(TrainRequest)} == set(props)
    assert props["batch_size"]["description"] == "global batch size"
    assert props["device"]["anyOf"][0]["enum"] == ["auto", "cpu", "cuda"]
    got = train_pipeline.validate_parameters({"request": {"model": "vgg11", "epochs": "3"}})
    assert got["request"] == TrainRequest(model="vgg11", epochs=3)
    for bad in ({"epoch": 3}, {"device": "gpu"}):
        with pytest.raises(ParameterTypeError):
            train_pipeline.validate_parameters({"request": bad})
    got = compare_architectures.validate_parameters({"request": {"models": "lenet5,vgg11"}})
    assert got["request"].models == ("lenet5", "vgg11")


@pytest.mark.parametrize(
    ("shortcut", "override", "expected"),
    [
        ({"epochs": 0}, None, r"optim\.epochs=0 must be > 0; change epochs \(--epochs\)$"),
        ({"lr": -1.0}, None, r"optim\.lr=-1\.0 must be > 0; change lr \(--lr\)$"),
        ({"batch_size": 0}, None, r"optim\.batch_size=0 must be > 0; change batch_size"),
        # Set with --set, the --set advice stands; a good flag does not take a bad --set's blame.
        ({}, "optim.epochs=0", r"optim\.epochs=0 must be > 0; set optim\.epochs in the config"),
        ({"epochs": 3}, "optim.lr=0", r"optim\.lr=0\.0 must be > 0; set optim\.lr in the config"),
    ],
)
def test_a_bad_value_from_a_flag_is_fixed_at_that_flag(
    tmp_path, shortcut: dict, override: str | None, expected: str
) -> None:
    """`--epochs 0` overrides any `--set optim.epochs=...`, so the error points at the flag."""
    from flows_helpers import tiny_dataset

    from tasks.plan import plan_training

    tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    request = TrainRequest(
        model="lenet5",
        dataset="imagefolder",
        data_dir=str(tmp_path / "data"),
        overrides=[override] if override else None,
        **shortcut,
    )
    with pytest.raises(ValueError, match=expected):
        plan_training(request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written
