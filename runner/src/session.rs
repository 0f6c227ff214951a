//! A training run driven one step at a time by its caller, with batches from memory instead of a
//! `--data` file: what the Python package (`python/`) runs, with the semantics of `cleave train`.
//!
//! [`Session::new`] takes the flags of `cleave train` ([`TrainArgs`]; `data`, `steps` and the
//! reporting flags are not read) and builds what that command builds: with one stage and one
//! microbatch (and no `--remat`/`--memory-limit`, nor `--precision f16`), the compiled training
//! step with its optimizer ([`crate::train`]); otherwise the pipeline executor under its schedule
//! ([`crate::pipeline_train::build_pipeline`]). Under f16 the session runs `cleave train`'s
//! dynamic loss scale ([`crate::pipeline_train::LossScaler`]): it feeds the scale input itself
//! (callers never see it among [`Session::data_inputs`]), rolls back steps whose gradients are
//! not finite, and keeps the scale in its checkpoints. [`Session::step`] runs one step on a
//! batch of `M × b` examples (`b` the model's traced batch, `M` the microbatches): the same
//! loss and weights as `cleave train` reading the same examples in the same order.
//!
//! **State.** The parameters (and optimizer state) stay in the compiled plan or the pipeline
//! between steps; [`Session::params`] copies them out, [`Session::set_params`] in, by name with
//! shapes checked. Checkpoints ([`Session::save`], [`Session::load`]) are `cleave train`'s
//! format: a session resumes a command-line run's checkpoint and the reverse.
//!
//! **Copies.** A batch is copied once, from the caller's memory into the plans' argument
//! buffers: on the pipeline path each microbatch is a borrowed range of the caller's rows.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cleave_ir::{DType, Function};
use cleave_runtime::pipeline::{Pipeline, PipelineOptions};
use cleave_runtime::{compile_with, Codegen, CompileOptions, HostData, HostSlice, Plan};

use cleave_passes::autodiff::methods::{GradMethod, FG_TANGENT_PREFIX};
use cleave_passes::autodiff::{GRAD_PREFIX, LOSS_SCALE_INPUT};

use crate::train::{
    build_step_compressed, checkpoint_meta, eval_plan, initial_state, parse_grad_method, set_args,
    set_host, write_checkpoint, State, TrainArgs,
};

/// One named tensor handed to a session: its shape and its elements, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The name of the model's input.
    pub name: &'a str,
    /// The shape of the tensor.
    pub shape: &'a [usize],
    /// Its elements, row-major.
    pub data: HostSlice<'a>,
}

/// A data input of the model: its name, element type and shape per step (leading dimension the
/// examples of one step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataInput {
    /// The input's name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape for one step.
    pub shape: Vec<usize>,
}

enum Engine {
    /// The compiled training step; `fresh` while its outputs hold the newest state (after a
    /// step, until the next one carries them into the arguments).
    One {
        plan: Box<Plan>,
        state: State,
        state_out: Vec<(String, usize)>,
        loss: usize,
        fresh: bool,
    },
    /// The pipeline executor and the parameters (with their shapes) between steps.
    Pipe {
        pipe: Box<Pipeline>,
        params: BTreeMap<String, HostData>,
        shapes: BTreeMap<String, Vec<usize>>,
        opts: PipelineOptions,
        /// The optimizer other than SGD, applied after each step.
        updater: Option<Box<crate::pipeline_train::Updater>>,
        /// `--precision f16`'s dynamic loss scale.
        scaler: Option<crate::pipeline_train::LossScaler>,
    },
}

/// A model built for training, stepped by its caller (see the module docs).
pub struct Session {
    args: TrainArgs,
    forward: Function,
    /// The loaded module (with its loss): what [`Session::grad`] differentiates.
    module: cleave_ir::Module,
    mb: usize,
    lr: f64,
    method: GradMethod,
    /// Forward-gradient tangent inputs: name and elements.
    tangents: Vec<(String, usize)>,
    engine: Engine,
    steps: usize,
    eval: Option<Plan>,
    grad: Option<(Function, Plan)>,
}

fn compile_opts(preserve_args: bool, codegen: Codegen) -> CompileOptions {
    CompileOptions {
        fuse: true,
        preserve_args,
        jit: true,
        codegen,
    }
}

impl Session {
    /// Builds the session `a` describes (see the module docs).
    pub fn new(a: &TrainArgs) -> Result<Self> {
        let method = parse_grad_method(&a.grad_method, a.tangents)?;
        let lr = a.lr.unwrap_or(a.optimizer.default_lr());
        let scaler = crate::pipeline_train::LossScaler::for_args(a)?;
        let pipelined = a.stages > 1
            || a.microbatches > 1
            || a.remat.is_some()
            || a.memory_limit.is_some()
            || a.chunk_lm_head.is_some()
            || a.grad_clip.is_some()
            // f16's dynamic loss scale runs on the pipeline executor, as in `cleave train`.
            || scaler.is_some();
        if a.stages == 0 || a.microbatches == 0 {
            bail!("stages and microbatches must be at least 1");
        }
        // Forward-gradient tangent inputs (name, elements), drawn every step as `cleave train`
        // draws them.
        let tangents: Vec<(String, usize)>;
        let tm = crate::train::load_training_model_for(a)?;
        let mb = tm.traced;
        let module = tm.loaded.module.clone();
        let (forward, engine) = if pipelined {
            let step_forward = crate::train::training_forward(&tm.forward, a.chunk_lm_head)?;
            tangents = crate::pipeline_train::tangent_inputs(&step_forward, &method);
            let built = crate::pipeline_train::build_pipeline(a, &step_forward, a.quiet, None)?;
            let state = crate::pipeline_train::PipelineState::new(
                a,
                lr,
                &tm.forward,
                &tm.loaded,
                &built.module,
            )?;
            let opts = crate::pipeline_train::step_options(a, lr);
            (
                tm.forward,
                Engine::Pipe {
                    pipe: Box::new(built.pipe),
                    params: state.params,
                    shapes: state.shapes,
                    opts,
                    updater: state.updater.map(Box::new),
                    scaler,
                },
            )
        } else {
            let built = build_step_compressed(
                &a.model,
                a.batch,
                (a.loss, a.labels.clone(), a.loss_output.clone()),
                a.optimizer,
                lr,
                &method,
                (
                    crate::train::parse_compress(a.compress.as_deref())?,
                    crate::train::parse_precision(a.precision.as_deref())?,
                ),
            )?;
            tangents = built
                .step
                .args()
                .filter(|x| x.name.starts_with(FG_TANGENT_PREFIX))
                .map(|x| (x.name.to_string(), x.ty.num_elements()))
                .collect();
            let mut plan = compile_with(&built.step, &compile_opts(false, a.codegen))?;
            let (state, _) = initial_state(&built, a.seed, None, &a.optimizer)?;
            for (name, (_, d)) in &state {
                let i = plan.arg_index(name).expect("state names are arguments");
                set_host(&mut plan, i, d)?;
            }
            let state_out = state
                .keys()
                .filter_map(|n| plan.output_index(n).map(|i| (n.clone(), i)))
                .collect();
            let loss = plan.output_index("loss").context("the step has no loss")?;
            (
                built.forward,
                Engine::One {
                    plan: Box::new(plan),
                    state,
                    state_out,
                    loss,
                    fresh: false,
                },
            )
        };
        Ok(Session {
            args: a.clone(),
            forward,
            module,
            mb,
            lr,
            method,
            tangents,
            engine,
            steps: 0,
            eval: None,
            grad: None,
        })
    }

    /// Under `--precision f16`: the loss scale of the next step and the steps rolled back so
    /// far for non-finite gradients.
    pub fn loss_scale(&self) -> Option<(f32, usize)> {
        match &self.engine {
            Engine::Pipe {
                scaler: Some(s), ..
            } => Some((s.scale, s.skipped)),
            _ => None,
        }
    }

    /// Examples per step: the microbatches times the model's traced batch.
    pub fn batch(&self) -> usize {
        self.args.microbatches * self.mb
    }

    /// The model's traced batch (the microbatch; what [`Session::run`] and [`Session::grad`]
    /// take).
    pub fn microbatch(&self) -> usize {
        self.mb
    }

    /// Steps run (counting those of a loaded checkpoint).
    pub fn steps_done(&self) -> usize {
        self.steps
    }

    /// The forward function (with the loss).
    pub fn forward(&self) -> &Function {
        &self.forward
    }

    /// The data inputs and their shapes for one step (see [`Session::batch`]).
    pub fn data_inputs(&self) -> Vec<DataInput> {
        let m = self.args.microbatches;
        self.forward
            .data_inputs()
            .filter(|x| x.name != LOSS_SCALE_INPUT)
            .map(|x| {
                let mut shape = x.ty.shape.clone();
                if let Some(d) = shape.first_mut() {
                    *d *= m;
                }
                DataInput {
                    name: x.name.to_string(),
                    dtype: x.ty.dtype,
                    shape,
                }
            })
            .collect()
    }

    /// Checks `inputs` against the data inputs of `func` at `rows` examples: every one given
    /// once, with its shape and element type; returns them in `func`'s order.
    fn match_inputs<'a>(
        func: &Function,
        inputs: &[Input<'a>],
        factor: usize,
    ) -> Result<Vec<Input<'a>>> {
        let mut out = Vec::new();
        // f16's loss scale is the session's to feed, never the caller's.
        let want: Vec<_> = func
            .data_inputs()
            .filter(|x| x.name != LOSS_SCALE_INPUT)
            .collect();
        for x in inputs {
            if !want.iter().any(|w| w.name == x.name) {
                bail!(
                    "`{}` is not a data input of @{} (its data inputs: {})",
                    x.name,
                    func.name,
                    want.iter()
                        .map(|w| format!("`{}`", w.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        for w in want {
            let x = inputs
                .iter()
                .find(|x| x.name == w.name)
                .with_context(|| format!("input `{}` is missing", w.name))?;
            let mut shape = w.ty.shape.clone();
            if let Some(d) = shape.first_mut() {
                *d *= factor;
            }
            let dtype = x.data.dtype();
            if x.shape != shape.as_slice() || dtype != w.ty.dtype {
                bail!(
                    "input `{}` is {dtype}{:?}; the model needs {}{shape:?}{}",
                    w.name,
                    x.shape,
                    w.ty.dtype,
                    if factor > 1 {
                        format!(" ({factor} microbatches of {})", w.ty.shape[0])
                    } else {
                        String::new()
                    }
                );
            }
            let n: usize = shape.iter().product();
            let len = x.data.len();
            if len != n {
                bail!("input `{}` has {len} elements for shape {shape:?}", w.name);
            }
            out.push(*x);
        }
        Ok(out)
    }

    /// Runs one training step on `batch` (every data input, [`Session::batch`] examples);
    /// returns the step's loss (the mean over its examples).
    pub fn step(&mut self, batch: &[Input<'_>]) -> Result<f64> {
        let m = self.args.microbatches;
        let inputs = Self::match_inputs(&self.forward, batch, m)?;
        let step = self.steps;
        let sizes: Vec<usize> = self.tangents.iter().map(|(_, n)| *n).collect();
        let drawn = crate::train::draw_tangents(self.args.seed, step, &sizes);
        let tangents: Vec<(&str, HostSlice<'_>)> = self
            .tangents
            .iter()
            .zip(&drawn)
            .map(|((name, _), d)| (name.as_str(), d.as_slice()))
            .collect();
        let loss = match &mut self.engine {
            Engine::One {
                plan, loss, fresh, ..
            } => {
                if *fresh {
                    plan.carry();
                    *fresh = false;
                }
                let given = inputs.iter().map(|x| (x.name, x.data));
                for (name, data) in given.chain(tangents.iter().copied()) {
                    plan.set_input_named(name, data)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                plan.run()
                    .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
                *fresh = true;
                plan.output_f32(*loss).map(|v| v[0]).unwrap_or(f32::NAN) as f64
            }
            Engine::Pipe {
                pipe,
                params,
                opts,
                updater,
                scaler,
                ..
            } => {
                // f16: every microbatch seeds its backward with the scale, and the stages'
                // gradient sums are scaled back by 1/(M·S) (see `LossScaler`).
                let scale = scaler.as_ref().map(|s| (s.input(), s.options(opts, m)));
                let scale_in = scale
                    .as_ref()
                    .map(|(d, _)| (LOSS_SCALE_INPUT.to_string(), d.as_slice()));
                let opts = scale.as_ref().map_or(&*opts, |(_, o)| o);
                // Microbatch `j` is rows `j·b … (j+1)·b − 1` of every input, read in place.
                let micro: Vec<BTreeMap<String, HostSlice<'_>>> = (0..m)
                    .map(|j| {
                        inputs
                            .iter()
                            .map(|x| (x.name.to_string(), rows_of(x.data, j, m)))
                            .chain(tangents.iter().map(|&(n, d)| (n.to_string(), d)))
                            .chain(scale_in.clone())
                            .collect()
                    })
                    .collect();
                let mut r = pipe
                    .step(params, &micro, opts)
                    .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
                let loss = r.losses.iter().map(|&x| x as f64).sum::<f64>() / m as f64;
                if scaler.is_some() {
                    crate::pipeline_train::LossScaler::check_loss(step, loss)?;
                }
                let norm = crate::pipeline_train::finish_scaled_step(
                    &mut r,
                    params,
                    updater.as_deref_mut(),
                    self.args.grad_clip,
                    opts,
                    scaler.as_ref().map(|s| s.scale),
                )?;
                if let Some(s) = scaler.as_mut() {
                    s.record(step, norm)?;
                }
                loss
            }
        };
        if !loss.is_finite() {
            bail!("loss is {loss} at step {step}");
        }
        self.steps += 1;
        Ok(loss)
    }

    /// The whole training state by name with shapes: the parameters, and on the one-stage path
    /// the optimizer's state (`opt.*`).
    fn state(&self) -> State {
        match &self.engine {
            Engine::One {
                plan,
                state,
                state_out,
                fresh,
                ..
            } => {
                let mut s = state.clone();
                if *fresh {
                    for (name, oi) in state_out {
                        s.get_mut(name).expect("state").1 = plan.output(*oi);
                    }
                } else {
                    for (name, (_, d)) in s.iter_mut() {
                        if let Some(i) = plan.arg_index(name) {
                            *d = plan.arg(i);
                        }
                    }
                }
                s
            }
            Engine::Pipe { params, shapes, .. } => {
                crate::pipeline_train::with_shapes(shapes, params)
            }
        }
    }

    /// The model's parameters by name, with their shapes.
    pub fn params(&self) -> State {
        let mut s = self.state();
        s.retain(|name, _| self.forward.params().any(|p| p.name == name));
        s
    }

    /// Sets parameters (or optimizer state) by name; a name the model lacks or a shape that
    /// differs is an error, and nothing is set then.
    pub fn set_params(&mut self, values: &[Input<'_>]) -> Result<()> {
        let state = self.state();
        for x in values {
            let (shape, _) = state.get(x.name).with_context(|| {
                format!("`{}` is not a parameter of @{}", x.name, self.forward.name)
            })?;
            if x.shape != shape.as_slice() {
                bail!(
                    "`{}` is {:?}; the model's parameter is {shape:?}",
                    x.name,
                    x.shape
                );
            }
            if !matches!(x.data, HostSlice::F32(_)) {
                bail!("`{}`: parameters are f32", x.name);
            }
        }
        match &mut self.engine {
            Engine::One { plan, fresh, .. } => {
                if *fresh {
                    plan.carry();
                    *fresh = false;
                }
                for x in values {
                    plan.set_input_named(x.name, x.data)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
            Engine::Pipe { params, .. } => {
                for x in values {
                    if let HostSlice::F32(v) = x.data {
                        params.insert(x.name.to_string(), HostData::F32(v.to_vec()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the forward function (with the loss) on one microbatch under the current
    /// parameters: every output by name with its shape.
    pub fn run(&mut self, inputs: &[Input<'_>]) -> Result<State> {
        let mut inputs = Self::match_inputs(&self.forward, inputs, 1)?;
        if self
            .forward
            .data_inputs()
            .any(|x| x.name == LOSS_SCALE_INPUT)
        {
            // An f16 forward's loss is unscaled.
            inputs.push(Input {
                name: LOSS_SCALE_INPUT,
                shape: &[],
                data: HostSlice::F32(&[1.0]),
            });
        }
        let params = self.params();
        let plan = eval_plan(&mut self.eval, &self.forward, self.args.codegen)?;
        run_plan(plan, &params, &inputs)
    }

    /// The gradient of the loss with respect to every parameter on one microbatch, under the
    /// current parameters (no update): `grad.<name>` of `cleave grad`, by parameter name.
    pub fn grad(&mut self, inputs: &[Input<'_>]) -> Result<State> {
        if self.grad.is_none() {
            let mut module = self.module.clone();
            let name = self.forward.name.clone();
            let pm =
                cleave_passes::PassManager::from_pipeline(&format!("autodiff{{function={name}}}"))?;
            pm.run(
                &mut module,
                &mut cleave_passes::PassContext::default(),
                &mut |_| {},
            )
            .map_err(|e| anyhow::anyhow!("autodiff: {e}"))?;
            let func = module
                .function(&name)
                .context("the forward function")?
                .clone();
            let plan = compile_with(&func, &compile_opts(true, self.args.codegen))?;
            self.grad = Some((func, plan));
        }
        let params = self.params();
        let (func, plan) = self.grad.as_mut().expect("built above");
        let inputs = Self::match_inputs(func, inputs, 1)?;
        let out = run_plan(plan, &params, &inputs)?;
        Ok(out
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(GRAD_PREFIX).map(|n| (n.to_string(), v)))
            .collect())
    }

    /// Writes a checkpoint of the state after the steps run (`cleave train`'s format).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut meta = checkpoint_meta(&self.args, self.steps, self.batch(), self.lr, &self.method);
        if let Engine::Pipe { scaler, .. } = &self.engine {
            meta.insert("microbatches".into(), self.args.microbatches.to_string());
            if let Some(s) = scaler {
                s.save(&mut meta);
            }
        }
        write_checkpoint(dir, &self.state(), meta)
    }

    /// Restores the state and the step count from a checkpoint (`cleave train`'s format, with
    /// this session's optimizer and batch).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let mut state = self.state();
        let (step, meta) = crate::train::restore_checkpoint(
            dir,
            &mut state,
            (self.batch(), ""),
            &self.args.optimizer,
            "this session",
        )?;
        match &mut self.engine {
            Engine::One { plan, fresh, .. } => {
                if *fresh {
                    plan.carry();
                    *fresh = false;
                }
                set_args(plan, state.iter().map(|(k, (_, d))| (k, d)))?;
            }
            Engine::Pipe { params, scaler, .. } => {
                if let Some(s) = scaler {
                    s.restore(&meta, dir)?;
                }
                params.extend(state.into_iter().map(|(k, (_, d))| (k, d)));
            }
        }
        self.steps = step;
        Ok(())
    }
}

/// Rows `j·n/m … (j+1)·n/m` of a step's tensor: microbatch `j` of `m`, borrowed.
fn rows_of(data: HostSlice<'_>, j: usize, m: usize) -> HostSlice<'_> {
    fn part<T>(v: &[T], j: usize, m: usize) -> &[T] {
        let per = v.len() / m;
        &v[j * per..(j + 1) * per]
    }
    match data {
        HostSlice::F32(v) => HostSlice::F32(part(v, j, m)),
        HostSlice::I32(v) => HostSlice::I32(part(v, j, m)),
        HostSlice::Bool(v) => HostSlice::Bool(part(v, j, m)),
        HostSlice::BF16(v) => HostSlice::BF16(part(v, j, m)),
        HostSlice::I8(v) => HostSlice::I8(part(v, j, m)),
        HostSlice::F16(v) => HostSlice::F16(part(v, j, m)),
    }
}

/// Sets `params` and `inputs` on a plan with preserved arguments, runs it, and returns every
/// output by name with its shape.
fn run_plan(plan: &mut Plan, params: &State, inputs: &[Input<'_>]) -> Result<State> {
    set_args(plan, params.iter().map(|(k, (_, d))| (k, d)))?;
    for x in inputs {
        plan.set_input_named(x.name, x.data)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    plan.run().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(plan
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, o)| (o.name.clone(), (o.ty.shape.clone(), plan.output(i))))
        .collect())
}
