"""cleave from Python: hand it a ``torch.nn.Module`` (or an ``.onnx``/``.cir`` file), train it
one step at a time, pipelined or not, and take the trained weights back.

.. code-block:: python

    import cleave, torch
    model = MyModel()
    plan = cleave.compile(model, example_inputs=(x, y), loss="cross-entropy", stages=2,
                          microbatches=4, schedule="zb-h1")
    print(plan.inspect("memory"))          # the text of `cleave inspect --memory`
    for batch in loader:                   # (x, y) or {"x": ..., "labels": ...}
        loss = plan.step(batch)            # numpy arrays or torch tensors
    model.load_state_dict(plan.state_dict())

Everything runs in cleave's native module (``cleave._cleave``, Rust): the model is imported,
differentiated, split into dgrad/wgrad programs, partitioned and compiled exactly as ``cleave
train`` does, with the same flags, defaults and error messages (raised as
:class:`CleaveError`). Parameters stay in cleave between steps; a batch is read in place from
the caller's arrays (C-contiguous float32/int32; anything else is converted once).

A step reads ``plan.batch`` examples: ``microbatches`` times the batch the model was exported
(or traced) at, which is the microbatch. ``run`` and ``grad`` take one microbatch.
"""

from __future__ import annotations

import inspect as _pyinspect
import json as _json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import _cleave
from ._cleave import CleaveError

__all__ = [
    "CleaveError",
    "Plan",
    "Schedule",
    "compile",
    "read_tensors",
    "schedule",
]
__version__ = _cleave.__version__

# bfloat16 (a stash type of `--compress bf16`/`--precision bf16`) has no NumPy dtype: its bit
# patterns come back as uint16.
_NUMPY = {
    "float32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "bfloat16": np.uint16,
    "float16": np.float16,
    "int8": np.int8,
}
_KIND = {"f32": "f", "i32": "i", "bool": "b"}


def _numpy(value: Any) -> np.ndarray:
    """A numpy view of a torch tensor (no copy on the CPU) or of anything array-like."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach()
        if getattr(value, "device", None) is not None and value.device.type != "cpu":
            value = value.cpu()
        return value.numpy()
    return np.asarray(value)


def _for_cleave(name: str, value: Any, want: str | None) -> np.ndarray:
    """`value` as cleave reads it: C-contiguous float32 or int32 (a view, no copy, when it is
    already one), bool as uint8 bytes. ``want`` is the model's element type when known."""
    a = _numpy(value)
    kind = _KIND.get(want or "", a.dtype.kind)
    if kind == "f":
        return np.ascontiguousarray(a, dtype=np.float32)
    if kind in "iu":
        if a.dtype != np.int32:
            if a.size and (int(a.max()) > 2**31 - 1 or int(a.min()) < -(2**31)):
                raise CleaveError(
                    f"`{name}`: a value does not fit cleave's int32 index type"
                )
            a = a.astype(np.int32)
        return np.ascontiguousarray(a)
    if kind == "b":
        return np.ascontiguousarray(a, dtype=np.bool_).view(np.uint8)
    raise CleaveError(f"`{name}`: arrays of {a.dtype} are not supported")


def _from_cleave(values: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    return {
        k: np.frombuffer(b, dtype=_NUMPY[dt]).reshape(shape)
        for k, (dt, shape, b) in values.items()
    }


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (int64 read as int32, cleave's index type)."""
    return _from_cleave(_cleave.read_tensors(os.fspath(path)))


class Schedule:
    """A simulated pipeline schedule (``cleave schedule``): ``data`` is its JSON (bubble rates,
    makespan, per-device peaks, the action lists), ``svg`` its timeline, shown inline in
    Jupyter."""

    def __init__(self, data: dict, svg: str, fits: bool):
        self.data = data
        self.svg = svg
        self.fits = fits

    @property
    def bubble_rate(self) -> float:
        return self.data["bubble_rate"]

    @property
    def actions(self) -> list[list[str]]:
        return self.data["actions"]

    def _repr_svg_(self) -> str:
        return self.svg

    def __repr__(self) -> str:
        d = self.data
        return (
            f"Schedule({d['schedule']}, P={len(d['actions'])}, makespan {d['makespan']:.6g}, "
            f"bubble rate {d['bubble_rate']:.4f})"
        )


def schedule(name: str = "1f1b", stages: int = 4, microbatches: int = 8,
             costs: Sequence[float] | None = (1.0, 1.0, 1.0), **flags: Any) -> Schedule:
    """Builds and simulates a schedule: ``cleave schedule --schedule NAME --stages P
    --microbatches M --costs TF,TB,TW[,TCOMM]`` (unit costs by default; ``costs=None`` with
    ``model=PATH.cir`` takes them from the model's split stages), with any other flag of that
    command as a keyword (``memory=``, ``memory_limit=``, ``grad_method=``, …)."""
    if costs is not None and "model" not in flags:
        flags["costs"] = ",".join(str(float(c)) for c in costs)
    for key in ("memory",):
        if isinstance(flags.get(key), (tuple, list)):
            flags[key] = ",".join(str(float(c)) for c in flags[key])
    args = ["--schedule", name, "--stages", str(stages), "--microbatches", str(microbatches),
            "--json"] + _flags(flags)
    text, svg, fits = _cleave.schedule(args)
    return Schedule(_json.loads(text), svg, fits)


def _flags(values: Mapping[str, Any]) -> list[str]:
    """Keyword arguments as command-line flags: ``memory_limit="8G"`` → ``--memory-limit 8G``;
    ``True`` → the bare flag; ``None``/``False`` → nothing."""
    out: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        out.append(flag)
        if value is not True:
            out.append(str(value))
    return out


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is installed and ``enabled``; otherwise a stand-in that does
    nothing."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Quiet()


class Plan:
    """A model compiled for training (see the module docs). Made by :func:`compile`."""

    def __init__(self, model: str, flags: list[str], *, module: Any = None,
                 workdir: str | None = None, inspect_flags: list[str] | None = None):
        self.model = model
        self._flags = flags
        self._session = _cleave.Session([model] + flags)
        self._inputs = [(n, dt, tuple(s)) for n, dt, s in self._session.data_inputs()]
        self._module = module
        self._workdir = workdir
        self._inspect_flags = inspect_flags or []

    def __del__(self):
        if getattr(self, "_workdir", None):
            shutil.rmtree(self._workdir, ignore_errors=True)

    # -- shapes ---------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        """Examples per step (microbatches × the traced batch)."""
        return self._session.batch

    @property
    def microbatch(self) -> int:
        """The traced batch: what :meth:`run` and :meth:`grad` take."""
        return self._session.microbatch

    @property
    def steps_done(self) -> int:
        return self._session.steps_done

    @property
    def loss_scale(self) -> tuple[float, int] | None:
        """With ``precision="f16"``: the next step's dynamic loss scale and the number of steps
        rolled back so far for non-finite gradients (``None`` under other precisions)."""
        return self._session.loss_scale

    @property
    def inputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The data inputs of one step: ``(name, dtype, shape)``."""
        return list(self._inputs)

    def _batch(self, batch: Any) -> dict[str, np.ndarray]:
        """A batch as cleave's inputs: a mapping by input name, a sequence in the order of
        :attr:`inputs`, or one array for a model with one data input."""
        names = [n for n, _, _ in self._inputs]
        if isinstance(batch, Mapping):
            values = dict(batch)
        elif isinstance(batch, (tuple, list)):
            if len(batch) != len(names):
                raise CleaveError(
                    f"a batch of {len(batch)} arrays for {len(names)} data inputs "
                    f"({', '.join(names)}); pass a dict by name"
                )
            values = dict(zip(names, batch))
        elif len(names) == 1:
            values = {names[0]: batch}
        else:
            raise CleaveError(f"the model has data inputs {', '.join(names)}: pass a dict or "
                              "a tuple in that order")
        types = {n: dt for n, dt, _ in self._inputs}
        return {k: _for_cleave(k, v, types.get(k)) for k, v in values.items()}

    # -- training -------------------------------------------------------------------------

    def step(self, batch: Any) -> float:
        """One training step on ``plan.batch`` examples; returns the loss (their mean)."""
        return self._session.step(self._batch(batch))

    def train(self, data: Any, steps: int | None = None, *, checkpoint: str | None = None,
              checkpoint_every: int = 100, progress: bool = True) -> list[float]:
        """Runs steps over ``data``: an iterable of batches, or a mapping of whole arrays (a
        dataset such as :func:`read_tensors` returns) read in consecutive batches of
        ``plan.batch`` examples, cycling. Stops after ``steps`` (or when the iterable ends).
        With ``checkpoint``, writes one every ``checkpoint_every`` steps, at the end, and on
        Ctrl-C before re-raising, so no finished step is lost. Returns the losses."""
        if isinstance(data, Mapping):
            arrays = {k: _numpy(v) for k, v in data.items()}
            n = min(len(v) for v in arrays.values())
            if n < self.batch:
                raise CleaveError(f"{n} examples, fewer than one step's {self.batch}")

            def batches():
                # `cleave train`'s order without --seed: the examples in order, wrapping.
                k = 0
                while True:
                    lo, hi = (k * self.batch) % n, (k * self.batch) % n + self.batch
                    if hi <= n:
                        yield {name: v[lo:hi] for name, v in arrays.items()}
                    else:
                        rows = np.arange(lo, hi) % n
                        yield {name: v[rows] for name, v in arrays.items()}
                    k += 1

            it: Iterable = batches()
            if steps is None:
                steps = n // self.batch
        else:
            it = data
        bar = _progress(steps or 0, "cleave train", progress)
        losses: list[float] = []
        try:
            for batch in it:
                if steps is not None and len(losses) >= steps:
                    break
                losses.append(self.step(batch))
                bar.update(1)
                bar.set_postfix_str(f"loss {losses[-1]:.4f}")
                if checkpoint and self.steps_done % max(checkpoint_every, 1) == 0:
                    self.save(checkpoint)
        except KeyboardInterrupt:
            if checkpoint:
                self.save(checkpoint)
            raise
        finally:
            bar.close()
        if checkpoint:
            self.save(checkpoint)
        return losses

    def evaluate(self, data: Mapping[str, Any], labels: str = "labels") -> tuple[float, float]:
        """Accuracy (argmax of ``logits`` against ``labels``) and mean loss over the whole
        microbatches of ``data`` (a mapping of arrays), as ``cleave train`` reports on its
        held-out examples."""
        arrays = {k: _numpy(v) for k, v in data.items()}
        n = min(len(v) for v in arrays.values())
        b = self.microbatch
        correct = total = 0
        losses = []
        for lo in range(0, n - b + 1, b):
            out = self.run({k: v[lo:lo + b] for k, v in arrays.items()})
            pred = out["logits"].reshape(-1, out["logits"].shape[-1]).argmax(axis=1)
            correct += int((pred == arrays[labels][lo:lo + b].reshape(-1)).sum())
            total += pred.size
            losses.append(float(out["loss"]))
        if not losses:
            raise CleaveError(f"{n} examples, fewer than one microbatch of {b}")
        return correct / total, float(np.mean(losses))

    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        """The forward outputs (with the loss) on one microbatch."""
        return _from_cleave(self._session.run(self._batch(inputs)))

    def grad(self, inputs: Any) -> dict[str, np.ndarray]:
        """The loss's gradient for every parameter on one microbatch, by parameter name; the
        parameters are not updated."""
        return _from_cleave(self._session.grad(self._batch(inputs)))

    # -- weights --------------------------------------------------------------------------

    def parameters(self) -> dict[str, np.ndarray]:
        """The trained parameters by name (numpy, copies)."""
        return _from_cleave(self._session.params())

    def state_dict(self) -> dict[str, Any]:
        """The trained weights by name. For a plan compiled from a ``torch.nn.Module``: torch
        tensors under the module's ``state_dict()`` keys (buffers as the module holds them,
        tied parameters under each of their names), so that ``module.load_state_dict(...)``
        takes it with ``strict=True``; otherwise numpy arrays of the parameters."""
        params = self.parameters()
        if self._module is None:
            return params
        import torch

        own = self._module.state_dict()
        by_storage = {}
        for key, t in own.items():
            if key in params:
                by_storage[(t.data_ptr(), tuple(t.shape))] = key
        out = {}
        for key, t in own.items():
            name = key if key in params else by_storage.get((t.data_ptr(), tuple(t.shape)))
            if name is None:
                out[key] = t.detach().clone()  # a buffer, as the module holds it
            else:
                out[key] = torch.from_numpy(params[name].copy()).to(t.dtype)
        return out

    def load_state_dict(self, values: Mapping[str, Any]) -> None:
        """Sets parameters by name (torch tensors or arrays); keys that are not parameters
        (buffers, tied aliases) are skipped; a shape that differs is an error."""
        params = self._session.params()
        chosen = {k: _for_cleave(k, v, "f32") for k, v in values.items() if k in params}
        self._session.set_params(chosen)

    def save(self, path: str | os.PathLike) -> None:
        """Writes a checkpoint into the directory ``path`` (``cleave train``'s format: ``cleave
        train --resume`` and ``cleave export-weights`` read it)."""
        self._session.save(os.fspath(path))

    def load(self, path: str | os.PathLike) -> None:
        """Restores a checkpoint (this plan's or a ``cleave train`` run's with the same model,
        optimizer and batch)."""
        self._session.load(os.fspath(path))

    # -- inspection -----------------------------------------------------------------------

    def inspect(self, what: str = "memory", *, json: bool = False, **flags: Any) -> str:
        """The text of ``cleave inspect``: ``"memory"`` (``--memory`` with this plan's stages,
        microbatches, schedule and limit), ``"split"`` (F/B/W FLOPs and stash per stage),
        ``"summary"`` (parameters, activations, FLOPs) or ``"ir"`` (the module and summary).
        Other flags of that command as keywords."""
        args = [self.model] + self._inspect_flags
        if what == "memory":
            args += ["--memory"] + self._plan_flags()
        elif what == "split":
            args += ["--split", "--summary"]
        elif what == "summary":
            args += ["--summary"]
        elif what != "ir":
            raise CleaveError(f"inspect: unknown view `{what}` (memory, split, summary, ir)")
        if json:
            args.append("--json")
        return _cleave.inspect(args + _flags(flags))

    def _flag(self, name: str, default: str) -> str:
        """The value this plan was built with for the flag ``name``."""
        f = self._flags
        return next((f[i + 1] for i in range(len(f) - 1) if f[i] == name), default)

    def _plan_flags(self) -> list[str]:
        out = []
        for name in ("--stages", "--microbatches", "--schedule", "--remat", "--memory-limit"):
            value = self._flag(name, "")
            if value:
                out += [name, value]
        return out

    def schedule(self, **flags: Any) -> Schedule:
        """This plan's schedule simulated (``cleave schedule``): with the costs of the model's
        split stages for a ``.cir`` model, unit costs otherwise; keywords override
        (``microbatches=16``) or add flags of that command."""
        kw: dict[str, Any] = {
            "name": self._flag("--schedule", "1f1b"),
            "stages": int(self._flag("--stages", "1")),
            "microbatches": int(self._flag("--microbatches", "1")),
        }
        if self.model.endswith(".cir"):
            kw.update(costs=None, model=self.model)
        kw.update(flags)
        return schedule(**kw)

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {dt}{list(s)}" for n, dt, s in self._inputs)
        return f"Plan({self.model}; step of {self.batch} examples: {ins})"


def _forward_names(module: Any) -> list[str]:
    params = _pyinspect.signature(module.forward).parameters.values()
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _export(module: Any, inputs: Sequence[Any], names: list[str], path: str) -> None:
    """``torch.onnx.export`` as cleave needs it: the dynamo exporter without its optimizer
    (parameters keep their names), in the module's current train()/eval() mode."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(inputs), dynamo=True, optimize=False,
                                    input_names=names, output_names=["logits"])
    program.save(path)


def compile(model: Any, example_inputs: Sequence[Any] | None = None, *,
            loss: str | None = None, labels: str | None = None, stages: int = 1,
            microbatches: int = 1, schedule: str = "1f1b",
            memory_limit: str | int | None = None, remat: str | None = None,
            optimizer: str = "sgd", lr: float | None = None, seed: int | None = None,
            batch: int | None = None, loss_output: str | None = None,
            input_names: Sequence[str] | None = None, progress: bool = True,
            **flags: Any) -> Plan:
    """Compiles ``model`` for training and returns a :class:`Plan`.

    ``model`` is a ``torch.nn.Module`` (exported with ``torch.onnx.export(dynamo=True,
    optimize=False)`` at the shapes of ``example_inputs``, which makes their batch the
    microbatch) or the path of an ``.onnx``/``.cir`` file. With ``loss`` (``"cross-entropy"``
    or ``"mse"``) the model's first output is the prediction and ``labels`` (default
    ``"labels"``) names the targets: ``example_inputs`` may end with them (one more than the
    module's ``forward`` takes). The other keywords are ``cleave train``'s flags: pipeline
    ``stages``, ``microbatches`` per step, the ``schedule`` (``1f1b``, ``zb-h1``, ``zb-h2``,
    ``zb-v``, ``interleaved``, ``auto``, …), a per-device ``memory_limit`` (``"8G"`` or bytes),
    ``remat``, the ``optimizer`` (``sgd``, ``momentum``, ``adamw``), ``lr``, ``seed`` (initialisation of
    parameters the file does not hold), ``batch`` (binds an ONNX model's symbolic batch).
    Any other flag of ``cleave train`` is a keyword too: ``grad_clip=1.0``, ``chunk_lm_head=8``,
    ``grad_method="dfa"``, …"""
    bar = _progress(2, "cleave.compile", progress)
    workdir = None
    module = None
    try:
        if hasattr(model, "forward") and hasattr(model, "state_dict"):
            if example_inputs is None:
                raise CleaveError("compiling a torch.nn.Module needs example_inputs")
            names = list(input_names) if input_names else _forward_names(model)
            inputs = list(example_inputs)
            n = min(len(inputs), len(names))
            if loss is not None and len(inputs) == len(names) + 1:
                inputs = inputs[:-1]  # the labels, which cleave's loss takes
                n = len(inputs)
            if len(inputs) > n:
                raise CleaveError(
                    f"{len(example_inputs)} example inputs for forward({', '.join(names)})"
                )
            workdir = tempfile.mkdtemp(prefix="cleave-")
            path = os.path.join(workdir, "model.onnx")
            _export(model, inputs[:n], names[:n], path)
            module = model
        else:
            path = os.fspath(model)
            if not pathlib.Path(path).exists():
                raise CleaveError(f"{path}: no such file")
        bar.update(1)
        model_flags = _flags({"loss": loss, "labels": labels or ("labels" if loss else None),
                              "batch": batch, "loss_output": loss_output})
        flags = model_flags + _flags({
            "stages": stages, "microbatches": microbatches, "schedule": schedule,
            "memory_limit": memory_limit, "remat": remat, "optimizer": optimizer, "lr": lr,
            "seed": seed}) + _flags(flags) + ["--quiet"]
        plan = Plan(path, flags, module=module, workdir=workdir, inspect_flags=model_flags)
        workdir = None  # the plan owns it now
        bar.update(1)
        return plan
    finally:
        bar.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
