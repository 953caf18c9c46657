//! thalamus-device-py: the device SDK for Python (module `thalamus_device`), for prototypes and
//! test rigs. Build a wheel with `maturin build -m device-py/Cargo.toml` (or `cargo build -p
//! thalamus-device-py` and load `libthalamus_device.so` as `thalamus_device.so`).
//!
//! `Device(gateway, fingerprint, device_id, secret, timeout_ms=10000)` connects and logs in
//! (it raises `ConnectionError` when it cannot); its methods are those of the C ABI, on the
//! same blocking device (`thalamus_device_ffi::ThalamusDevice`): `dial(target) -> call_ref`,
//! `next_event(timeout_ms) -> dict | None`, `send_audio(call_ref, bytes)`,
//! `recv_audio(timeout_ms) -> (call_ref, bytes) | None`, `answer`, `hangup`, `dtmf`, `close`.
//! Each call releases the GIL while it waits. `examples/python/earpiece.py` is a whole device.
//!
//! It adds no behaviour of its own: the session, media and reconnection are the SDK's.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use thalamus_device_ffi::{ThalamusDevice, ThalamusEventKind};

/// A connected device.
#[pyclass(module = "thalamus_device")]
struct Device {
    inner: Mutex<Option<Box<ThalamusDevice>>>,
}

fn error(e: String) -> PyErr {
    PyRuntimeError::new_err(e)
}

impl Device {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut ThalamusDevice) -> Result<T, String> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let mut guard = self
                .inner
                .lock()
                .map_err(|_| "the device is poisoned".to_string())?;
            let device = guard
                .as_mut()
                .ok_or_else(|| "the device is closed".to_string())?;
            f(device)
        })
        .map_err(error)
    }
}

#[pymethods]
impl Device {
    /// Connects to `gateway` (`host:port`), pinning the certificate whose SHA-256 is
    /// `fingerprint` (hex; empty: the WebPKI roots), and logs in.
    #[new]
    #[pyo3(signature = (gateway, fingerprint, device_id, secret, timeout_ms = 10_000))]
    fn new(
        py: Python<'_>,
        gateway: &str,
        fingerprint: &str,
        device_id: &str,
        secret: &str,
        timeout_ms: u64,
    ) -> PyResult<Self> {
        let device = py
            .allow_threads(|| {
                thalamus_device_ffi::connect(
                    gateway,
                    fingerprint,
                    device_id,
                    secret,
                    Duration::from_millis(timeout_ms),
                )
            })
            .map_err(PyConnectionError::new_err)?;
        Ok(Self {
            inner: Mutex::new(Some(device)),
        })
    }

    /// Places a call offering PCMU; returns its call ref.
    fn dial(&self, py: Python<'_>, target: &str) -> PyResult<u32> {
        self.with(py, |d| d.dial(target))
    }

    /// The next event within `timeout_ms`, as a dict (`kind`: `live`, `call_state`,
    /// `incoming_call`, `text`, `disconnected`, `closed`, `other`; `call_ref`, `call_state`,
    /// `sip_status`, `resumed`), or None.
    fn next_event<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: u64,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let event = self.with(py, |d| d.next_event(Duration::from_millis(timeout_ms)))?;
        let kind = match event.kind {
            ThalamusEventKind::None => return Ok(None),
            ThalamusEventKind::Live => "live",
            ThalamusEventKind::CallState => "call_state",
            ThalamusEventKind::IncomingCall => "incoming_call",
            ThalamusEventKind::Text => "text",
            ThalamusEventKind::Disconnected => "disconnected",
            ThalamusEventKind::Closed => "closed",
            ThalamusEventKind::Other => "other",
        };
        let dict = PyDict::new(py);
        dict.set_item("kind", kind)?;
        dict.set_item("call_ref", event.call_ref)?;
        dict.set_item("call_state", event.call_state)?;
        dict.set_item("sip_status", event.sip_status)?;
        dict.set_item("resumed", event.resumed != 0)?;
        Ok(Some(dict))
    }

    /// Sends one PCMU frame (160 bytes for 20 ms) of call `call_ref`.
    fn send_audio(&self, py: Python<'_>, call_ref: u32, payload: &[u8]) -> PyResult<()> {
        let payload = payload.to_vec();
        self.with(py, move |d| d.send_audio(call_ref, &payload))
    }

    /// The next audio payload received within `timeout_ms`: `(call_ref, bytes)`, or None.
    fn recv_audio<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: u64,
    ) -> PyResult<Option<(u32, Bound<'py, PyBytes>)>> {
        let got = self.with(py, |d| d.recv_audio(Duration::from_millis(timeout_ms)))?;
        Ok(got.map(|(call_ref, payload)| (call_ref, PyBytes::new(py, &payload))))
    }

    /// Answers incoming call `call_ref` with PCMU.
    fn answer(&self, py: Python<'_>, call_ref: u32) -> PyResult<()> {
        self.with(py, |d| d.answer(call_ref))
    }

    /// Hangs call `call_ref` up.
    fn hangup(&self, py: Python<'_>, call_ref: u32) -> PyResult<()> {
        self.with(py, |d| d.hangup(call_ref))
    }

    /// Sends DTMF `digit` (one of `0123456789*#ABCD`) in call `call_ref`.
    fn dtmf(&self, py: Python<'_>, call_ref: u32, digit: &str) -> PyResult<()> {
        let mut chars = digit.chars();
        let (Some(c), None) = (chars.next(), chars.next()) else {
            return Err(PyValueError::new_err("one digit"));
        };
        self.with(py, |d| d.dtmf(call_ref, c))
    }

    /// Closes the session (`Goodbye`); the device is unusable after.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let device = py.allow_threads(|| self.inner.lock().ok().and_then(|mut g| g.take()));
        if let Some(mut d) = device {
            py.allow_threads(move || d.close());
        }
        Ok(())
    }
}

/// The module (`import thalamus_device`).
#[pymodule]
#[pyo3(name = "thalamus_device")]
fn thalamus_device_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Device>()?;
    Ok(())
}
