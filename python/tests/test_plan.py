"""The Python package against cleave's own references: runs with numpy alone (the torch parts use
models exported from PyTorch with their autograd gradients, `fixtures/make_fixtures.py`); the
tests at the end that need torch itself are skipped without it."""

import pathlib

import numpy as np
import pytest

import cleave

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
DIGITS = ROOT / "examples/data/digits.safetensors"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def digits():
    return cleave.read_tensors(DIGITS)


def test_compile_step_and_evaluate_the_digits_mlp(digits):
    plan = cleave.compile(ROOT / "examples/mlp-digits.cir", optimizer="adamw", seed=3,
                          progress=False)
    assert plan.batch == 32 and plan.microbatch == 32
    assert plan.inputs == [("x", "f32", (32, 64)), ("labels", "i32", (32,))]
    train = {k: v[:1600] for k, v in digits.items()}
    test = {k: v[1600:] for k, v in digits.items()}
    losses = plan.train(train, steps=200, progress=False)
    assert len(losses) == 200 and plan.steps_done == 200
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) / 3
    accuracy, loss = plan.evaluate(test)
    assert accuracy > 0.85, accuracy
    assert np.isfinite(loss)


def test_a_step_takes_dicts_tuples_and_other_dtypes(digits):
    a = cleave.compile(ROOT / "examples/mlp-digits.cir", seed=1, progress=False)
    b = cleave.compile(ROOT / "examples/mlp-digits.cir", seed=1, progress=False)
    x, y = digits["x"][:32], digits["labels"][:32]
    # float64 and int64 are converted once; a tuple is in the order of `inputs`.
    la = a.step({"x": x, "labels": y})
    lb = b.step((x.astype(np.float64), y.astype(np.int64)))
    assert la == lb


def test_other_train_flags_pass_through():
    kw = dict(seed=1, progress=False, microbatches=2)
    a = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=2, grad_clip=0.05, **kw)
    b = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=1, grad_clip=0.05, **kw)
    c = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=1, **kw)
    data = cleave.read_tensors(ROOT / "examples/data/modadd.safetensors")
    losses = []
    for k in range(3):
        batch = {n: v[k * 16:(k + 1) * 16] for n, v in data.items()}
        losses.append((a.step(batch), b.step(batch), c.step(batch)))
    assert all(x == y for x, y, _ in losses)
    assert any(x != z for x, _, z in losses[1:])
    with pytest.raises(cleave.CleaveError, match="unexpected argument '--no-such-flag'"):
        cleave.compile(ROOT / "examples/gpt-tiny.cir", no_such_flag=1, progress=False)


def test_f16_plans_run_the_dynamic_loss_scale():
    kw = dict(seed=1, progress=False, microbatches=2, precision="f16")
    # 2^24 overflows the backward's f16 products: the first steps are rolled back, halving it.
    plan = cleave.compile(ROOT / "examples/gpt-tiny.cir", loss_scale=2 ** 24, **kw)
    assert [n for n, _, _ in plan.inputs] == ["tokens", "targets"]
    assert plan.loss_scale == (2.0 ** 24, 0)
    data = cleave.read_tensors(ROOT / "examples/data/modadd.safetensors")
    for k in range(3):
        plan.step({n: v[k * 16:(k + 1) * 16] for n, v in data.items()})
    scale, skipped = plan.loss_scale
    assert skipped > 0 and scale == 2.0 ** 24 / 2 ** skipped
    assert cleave.compile(ROOT / "examples/gpt-tiny.cir", progress=False).loss_scale is None


def test_pipelined_plans_match_one_stage():
    kw = dict(seed=1, progress=False, microbatches=4)
    one = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=1, **kw)
    two = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=2, schedule="zb-h1", **kw)
    zbv = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=2, schedule="zb-v", **kw)
    data = cleave.read_tensors(ROOT / "examples/data/modadd.safetensors")
    assert one.batch == two.batch == 32
    for k in range(3):
        batch = {n: v[k * 32:(k + 1) * 32] for n, v in data.items()}
        l1, l2, l3 = one.step(batch), two.step(batch), zbv.step(batch)
        assert l1 == l2 == l3
    p1, p2 = one.parameters(), two.parameters()
    for name in p1:
        assert np.array_equal(p1[name], p2[name]), name


@pytest.mark.parametrize("name", ["mlp", "gpt_block"])
def test_gradients_match_torch_autograd(name):
    ref = cleave.read_tensors(FIXTURES / f"{name}.ref.safetensors")
    loss = "cross-entropy" if name == "mlp" else "mse"
    plan = cleave.compile(FIXTURES / f"{name}.onnx", loss=loss, progress=False)
    batch = {"x": ref["in.x"], "labels": ref["labels"]}
    out = plan.run(batch)
    assert rel_err(out["loss"], ref["loss"]) <= 1e-5
    grads = plan.grad(batch)
    torch_names = {k[len("grad."):] for k in ref if k.startswith("grad.")}
    assert set(grads) == torch_names
    for p in torch_names:
        err = rel_err(grads[p], ref[f"grad.{p}"])
        assert err <= 1e-5, (p, err)


def test_state_dict_and_checkpoints_round_trip(tmp_path, digits):
    plan = cleave.compile(ROOT / "examples/mlp-digits.cir", optimizer="adamw", seed=2,
                          progress=False)
    batches = [{k: v[i * 32:(i + 1) * 32] for k, v in digits.items()} for i in range(4)]
    for b in batches[:2]:
        plan.step(b)
    plan.save(tmp_path / "ck")
    weights = plan.state_dict()
    # A fresh plan given the weights computes the same forward outputs.
    other = cleave.compile(ROOT / "examples/mlp-digits.cir", optimizer="adamw", seed=9,
                           progress=False)
    other.load_state_dict(weights)
    for name, w in other.parameters().items():
        assert np.array_equal(w, weights[name])
    assert np.array_equal(other.run(batches[0])["logits"], plan.run(batches[0])["logits"])
    # A checkpoint (with the optimizer's state) resumes bit for bit.
    continued = [plan.step(b) for b in batches[2:]]
    resumed = cleave.compile(ROOT / "examples/mlp-digits.cir", optimizer="adamw", seed=9,
                             progress=False)
    resumed.load(tmp_path / "ck")
    assert resumed.steps_done == 2
    assert [resumed.step(b) for b in batches[2:]] == continued


def test_train_writes_a_checkpoint_on_interrupt(tmp_path, digits):
    plan = cleave.compile(ROOT / "examples/mlp-digits.cir", seed=1, progress=False)

    def batches():
        for i in range(3):
            yield {k: v[i * 32:(i + 1) * 32] for k, v in digits.items()}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plan.train(batches(), checkpoint=tmp_path / "ck", checkpoint_every=100, progress=False)
    again = cleave.compile(ROOT / "examples/mlp-digits.cir", seed=1, progress=False)
    again.load(tmp_path / "ck")
    assert again.steps_done == 3


def test_errors_are_exceptions_with_the_cli_messages(digits):
    with pytest.raises(cleave.CleaveError, match="no such file"):
        cleave.compile(ROOT / "examples/missing.cir", progress=False)
    with pytest.raises(cleave.CleaveError, match="unknown schedule `nope`"):
        cleave.compile(ROOT / "examples/mlp-digits.cir", stages=2, schedule="nope",
                       progress=False)
    with pytest.raises(cleave.CleaveError, match="invalid value 'x' for '--stages"):
        cleave.compile(ROOT / "examples/mlp-digits.cir", stages="x", progress=False)
    plan = cleave.compile(ROOT / "examples/mlp-digits.cir", progress=False)
    with pytest.raises(cleave.CleaveError, match=r"input `x` is f32\[2, 64\]; the model needs "
                                                  r"f32\[32, 64\]"):
        plan.step({"x": digits["x"][:2], "labels": digits["labels"][:2]})
    with pytest.raises(cleave.CleaveError, match="`pixels` is not a data input of @mlp"):
        plan.step({"pixels": digits["x"][:32], "labels": digits["labels"][:32]})
    with pytest.raises(cleave.CleaveError, match="is not a parameter"):
        plan._session.set_params({"nope": np.zeros(3, np.float32)})
    with pytest.raises(cleave.CleaveError, match="cross-entropy|mse"):
        cleave.compile(FIXTURES / "mlp.onnx", loss="hinge", progress=False)


def test_inspect_and_schedule_give_the_cli_text():
    plan = cleave.compile(ROOT / "examples/gpt-tiny.cir", stages=2, microbatches=4,
                          schedule="zb-h1", progress=False)
    memory = plan.inspect("memory")
    assert memory.startswith("schedule zb-h1:") and "saved B" in memory
    assert "stage" in plan.inspect("split")
    s = plan.schedule()
    assert s.svg.startswith("<svg") and s._repr_svg_() == s.svg
    assert len(s.actions) == 2 and 0 <= s.bubble_rate < 1
    unit = cleave.schedule("zb-v", stages=4, microbatches=8)
    assert unit.bubble_rate == 0.0


def test_a_torch_module_trains_and_loads_back():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4)).eval()
    x = torch.randn(6, 12)
    y = torch.randint(0, 4, (6,))
    plan = cleave.compile(model, example_inputs=(x, y), loss="cross-entropy", progress=False)
    grads = plan.grad((x, y))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    ref = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), ref):
        assert rel_err(grads[name], g.numpy()) <= 1e-5, name
    for _ in range(3):
        plan.step((x, y))
    model.load_state_dict(plan.state_dict())
    after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert abs(after - float(plan.run((x, y))["loss"])) < 1e-5
    assert after < loss.item()
