//! cleave's Python package: the native module `cleave._cleave` (built by maturin with the
//! `python` feature; see `python/pyproject.toml`). The package's Python half
//! (`python/cleave/__init__.py`) is the API users call; this module is what it runs:
//!
//! - `Session(flags)`: a [`cleave_compiler::session::Session`] built from the flags of `cleave
//!   train` (parsed by the same command-line parser, so the names, defaults and errors are the
//!   CLI's); `step`, `run`, `grad` take a dict of C-contiguous buffers (numpy arrays) that are
//!   read in place, without a copy; `params`, `run` and `grad` return dicts of
//!   `(dtype, shape, bytearray)`; `set_params`, `save`, `load`.
//! - `inspect(flags)`: the text `cleave inspect` prints; `schedule(flags)`: the text (or JSON)
//!   of `cleave schedule` and its SVG; `read_tensors(path)`: a safetensors file.
//! - `CleaveError`: every error, with the CLI's message (file, node, shape).
//!
//! Without the `python` feature the crate is empty, so `cargo build --workspace` needs only
//! Rust.

#[cfg(feature = "python")]
mod py {
    use std::path::Path;

    use clap::Parser;
    use cleave_compiler::cli::{Cli, Command};
    use cleave_compiler::session::{Input, Session as Inner};
    use cleave_runtime::{HostData, HostSlice};
    use pyo3::buffer::PyBuffer;
    use pyo3::create_exception;
    use pyo3::prelude::*;
    use pyo3::types::{PyByteArray, PyDict};

    create_exception!(_cleave, CleaveError, pyo3::exceptions::PyException);

    fn err(e: impl std::fmt::Display) -> PyErr {
        CleaveError::new_err(e.to_string())
    }

    fn anyhow_err(e: anyhow::Error) -> PyErr {
        CleaveError::new_err(format!("{e:#}"))
    }

    /// Parses `cleave SUBCOMMAND FLAGS…` with the CLI's parser.
    fn parse(sub: &str, flags: Vec<String>) -> PyResult<Command> {
        let argv = ["cleave".to_string(), sub.to_string()]
            .into_iter()
            .chain(flags);
        Cli::try_parse_from(argv)
            .map(|c| c.command)
            .map_err(|e| err(e.render().to_string().trim_end()))
    }

    /// A buffer of one of the element types cleave takes, held while its elements are read.
    enum Buf {
        F32(PyBuffer<f32>),
        I32(PyBuffer<i32>),
        /// `bool` elements, passed as bytes (numpy's `bool` viewed as `uint8`), each 0 or 1.
        Bool(PyBuffer<u8>),
    }

    impl Buf {
        fn get(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Buf> {
            let buf = if let Ok(b) = PyBuffer::<f32>::get(obj) {
                Buf::F32(b)
            } else if let Ok(b) = PyBuffer::<i32>::get(obj) {
                Buf::I32(b)
            } else if let Ok(b) = PyBuffer::<u8>::get(obj) {
                Buf::Bool(b)
            } else {
                return Err(err(format!(
                    "`{name}`: cleave takes float32, int32 or bool (as uint8) arrays (buffer \
                     protocol)"
                )));
            };
            let contiguous = match &buf {
                Buf::F32(b) => b.is_c_contiguous(),
                Buf::I32(b) => b.is_c_contiguous(),
                Buf::Bool(b) => b.is_c_contiguous(),
            };
            if !contiguous {
                return Err(err(format!("`{name}`: the array is not C-contiguous")));
            }
            if let Buf::Bool(b) = &buf {
                // SAFETY: C-contiguous bytes, alive while `b` is; the GIL is held.
                let bytes =
                    unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.item_count()) };
                if bytes.iter().any(|&x| x > 1) {
                    return Err(err(format!(
                        "`{name}`: a bool tensor's bytes must be 0 or 1 (a uint8 array is read \
                         as bool)"
                    )));
                }
            }
            Ok(buf)
        }

        fn shape(&self) -> &[usize] {
            match self {
                Buf::F32(b) => b.shape(),
                Buf::I32(b) => b.shape(),
                Buf::Bool(b) => b.shape(),
            }
        }

        fn slice(&self) -> HostSlice<'_> {
            // SAFETY: each buffer is C-contiguous (checked in `get`) and holds `item_count`
            // elements of its type (bytes checked to be 0 or 1 for bool); it stays alive, and
            // the GIL held, while the slice is used (the borrow of `self`), so Python code
            // cannot resize or free it meanwhile.
            unsafe {
                match self {
                    Buf::F32(b) => HostSlice::F32(std::slice::from_raw_parts(
                        b.buf_ptr() as *const f32,
                        b.item_count(),
                    )),
                    Buf::I32(b) => HostSlice::I32(std::slice::from_raw_parts(
                        b.buf_ptr() as *const i32,
                        b.item_count(),
                    )),
                    Buf::Bool(b) => HostSlice::Bool(std::slice::from_raw_parts(
                        b.buf_ptr() as *const bool,
                        b.item_count(),
                    )),
                }
            }
        }
    }

    /// The buffers of a dict of arrays, by name.
    fn buffers(values: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Buf)>> {
        values
            .iter()
            .map(|(k, v)| {
                let name: String = k.extract()?;
                let buf = Buf::get(&name, &v)?;
                Ok((name, buf))
            })
            .collect()
    }

    fn inputs(bufs: &[(String, Buf)]) -> Vec<Input<'_>> {
        bufs.iter()
            .map(|(name, b)| Input {
                name,
                shape: b.shape(),
                data: b.slice(),
            })
            .collect()
    }

    /// `{name: (dtype, shape, bytearray)}`.
    fn to_py<'py>(
        py: Python<'py>,
        state: cleave_compiler::train::State,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, (shape, d)) in state {
            let (dtype, bytes): (&str, Vec<u8>) = match &d {
                HostData::F32(v) => ("float32", v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
                HostData::I32(v) => ("int32", v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
                HostData::Bool(v) => ("bool", v.iter().map(|&b| b as u8).collect()),
                HostData::BF16(v) => ("bfloat16", v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
                HostData::I8(v) => ("int8", v.iter().map(|&x| x as u8).collect()),
                HostData::F16(v) => ("float16", v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            };
            out.set_item(name, (dtype, shape, PyByteArray::new(py, &bytes)))?;
        }
        Ok(out)
    }

    /// A model built for training (see the module docs).
    #[pyclass(unsendable, module = "cleave._cleave")]
    struct Session {
        inner: Inner,
    }

    #[pymethods]
    impl Session {
        /// Builds a session from `cleave train` flags (the model file first; `--data` is not
        /// needed).
        #[new]
        fn new(flags: Vec<String>) -> PyResult<Self> {
            let mut flags = flags;
            if !flags.iter().any(|f| f == "--data") {
                flags.extend(["--data".to_string(), "-".to_string()]);
            }
            let Command::Train(t) = parse("train", flags)? else {
                unreachable!("parsed as train")
            };
            let inner = Inner::new(&t.args).map_err(anyhow_err)?;
            Ok(Session { inner })
        }

        /// One training step on a dict of arrays; returns the loss.
        fn step(&mut self, batch: &Bound<'_, PyDict>) -> PyResult<f64> {
            let bufs = buffers(batch)?;
            self.inner.step(&inputs(&bufs)).map_err(anyhow_err)
        }

        /// The forward outputs on one microbatch.
        fn run<'py>(
            &mut self,
            py: Python<'py>,
            batch: &Bound<'py, PyDict>,
        ) -> PyResult<Bound<'py, PyDict>> {
            let bufs = buffers(batch)?;
            let out = self.inner.run(&inputs(&bufs)).map_err(anyhow_err)?;
            to_py(py, out)
        }

        /// The loss's gradient for every parameter on one microbatch (no update).
        fn grad<'py>(
            &mut self,
            py: Python<'py>,
            batch: &Bound<'py, PyDict>,
        ) -> PyResult<Bound<'py, PyDict>> {
            let bufs = buffers(batch)?;
            let out = self.inner.grad(&inputs(&bufs)).map_err(anyhow_err)?;
            to_py(py, out)
        }

        /// The parameters by name.
        fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            to_py(py, self.inner.params())
        }

        /// Sets parameters by name (shapes checked; nothing is set on an error).
        fn set_params(&mut self, values: &Bound<'_, PyDict>) -> PyResult<()> {
            let bufs = buffers(values)?;
            self.inner.set_params(&inputs(&bufs)).map_err(anyhow_err)
        }

        /// Writes a checkpoint (`cleave train`'s format) into the directory `path`.
        fn save(&self, path: &str) -> PyResult<()> {
            self.inner.save(Path::new(path)).map_err(anyhow_err)
        }

        /// Restores a checkpoint from the directory `path`.
        fn load(&mut self, path: &str) -> PyResult<()> {
            self.inner.load(Path::new(path)).map_err(anyhow_err)
        }

        /// The data inputs of one step: `[(name, dtype, shape)]`.
        fn data_inputs(&self) -> Vec<(String, String, Vec<usize>)> {
            self.inner
                .data_inputs()
                .into_iter()
                .map(|x| (x.name, x.dtype.to_string(), x.shape))
                .collect()
        }

        /// Examples per step.
        #[getter]
        fn batch(&self) -> usize {
            self.inner.batch()
        }

        /// The model's traced batch (what `run` and `grad` take).
        #[getter]
        fn microbatch(&self) -> usize {
            self.inner.microbatch()
        }

        /// Steps run, counting those of a loaded checkpoint.
        #[getter]
        fn steps_done(&self) -> usize {
            self.inner.steps_done()
        }

        /// Under `precision="f16"`: the next step's loss scale and the steps rolled back so far
        /// for non-finite gradients; `None` otherwise.
        #[getter]
        fn loss_scale(&self) -> Option<(f32, usize)> {
            self.inner.loss_scale()
        }

        /// The loss is the mean over these outputs' examples: the forward's output names.
        fn outputs(&self) -> Vec<String> {
            self.inner
                .forward()
                .outputs
                .iter()
                .map(|o| o.name.clone())
                .collect()
        }
    }

    /// The text `cleave inspect FLAGS…` prints.
    #[pyfunction]
    fn inspect(flags: Vec<String>) -> PyResult<String> {
        let Command::Inspect(a) = parse("inspect", flags)? else {
            unreachable!("parsed as inspect")
        };
        cleave_compiler::cli::inspect_text(&a).map_err(anyhow_err)
    }

    /// `cleave schedule FLAGS…`: `(text, svg, fits)`.
    #[pyfunction]
    fn schedule(flags: Vec<String>) -> PyResult<(String, String, bool)> {
        let Command::Schedule(a) = parse("schedule", flags)? else {
            unreachable!("parsed as schedule")
        };
        let out = cleave_compiler::schedule_cmd::schedule_text(&a).map_err(anyhow_err)?;
        Ok((out.text, out.svg, out.fits))
    }

    /// The tensors of a safetensors file, as `{name: (dtype, shape, bytearray)}`.
    #[pyfunction]
    fn read_tensors<'py>(py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyDict>> {
        let tensors =
            cleave_compiler::tensors::read_tensors(Path::new(path)).map_err(anyhow_err)?;
        let mut state = cleave_compiler::train::State::new();
        for (name, t) in tensors {
            let d = match t.dtype {
                cleave_ir::DType::I64 | cleave_ir::DType::I32 => HostData::I32(
                    t.as_i64()
                        .unwrap_or_default()
                        .iter()
                        .map(|&x| {
                            i32::try_from(x).map_err(|_| {
                                err(format!("`{name}`: {x} does not fit cleave's int32"))
                            })
                        })
                        .collect::<PyResult<_>>()?,
                ),
                cleave_ir::DType::Bool => HostData::Bool(t.as_bool().unwrap_or_default().to_vec()),
                _ => HostData::F32(t.to_f32_vec()),
            };
            state.insert(name, (t.shape.clone(), d));
        }
        to_py(py, state)
    }

    #[pymodule]
    fn _cleave(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_class::<Session>()?;
        m.add("CleaveError", m.py().get_type::<CleaveError>())?;
        m.add_function(wrap_pyfunction!(inspect, m)?)?;
        m.add_function(wrap_pyfunction!(schedule, m)?)?;
        m.add_function(wrap_pyfunction!(read_tensors, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
