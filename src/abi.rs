//! The proxy-wasm ABI (v0.2.1), written for this filter alone (wasm32 only): the host
//! functions it calls, as safe wrappers that return [`Status`] instead of panicking,
//! and the log sink. The callbacks Envoy calls are exported by `crate::envoy`.
//!
//! Why not the SDK: Envoy enters the VM once for every callback a module exports,
//! and the SDK exports them all (response headers, body and trailers, `on_log`,
//! `on_done`, …) and routes each through maps keyed by context id. Measured with
//! `make bench --probes`, a module that exports only what it uses costs Envoy about
//! a third of the SDK's no-op filter per request. So this module exports exactly the
//! callbacks the filter needs, and its wrappers turn every status the host can
//! answer into a value: the SDK panics on statuses it does not expect, which takes
//! the worker's VM down.
//!
//! Every wrapper copies what the host returns into memory it owns; nothing here
//! keeps a pointer past a call. Nothing here logs directive text (the log sink logs
//! what it is given; no caller gives it a directive).

use std::ptr::null_mut;

/// A host call's status (the ABI's `WasmResult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `NotFound` (1).
    NotFound,
    /// `BadArgument` (2).
    BadArgument,
    /// `CasMismatch` (8).
    CasMismatch,
    /// Any other failure, with its code.
    Other(u32),
}

fn status(code: u32) -> Result<(), Status> {
    match code {
        0 => Ok(()),
        1 => Err(Status::NotFound),
        2 => Err(Status::BadArgument),
        8 => Err(Status::CasMismatch),
        other => Err(Status::Other(other)),
    }
}

/// `BufferType`.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    /// The request body being processed.
    RequestBody = 0,
    /// The body of a callout's answer.
    CallResponseBody = 4,
    /// The plugin configuration.
    PluginConfiguration = 7,
}

/// `MapType`: whose headers.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Map {
    /// The request's.
    Request = 0,
    /// The response's.
    Response = 2,
    /// A callout's answer's.
    CallResponse = 6,
}

/// `MetricType`.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Metric {
    /// A counter.
    Counter = 0,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(kind: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(kind: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path: *const u8,
        path_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
}

/// Takes back a buffer the host allocated in this VM for its answer. The host got it
/// from [`crate::envoy`]'s `proxy_on_memory_allocate`: a `Vec<u8>` of exactly
/// `size` bytes, length and capacity, forgotten.
fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: see above; the host hands the buffer over and never touches it again.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Allocates `size` bytes for the host to write an answer into (the
/// `proxy_on_memory_allocate` export); [`take`] is its inverse. Not zeroed: the host
/// writes all of them before handing the buffer back (a 64 KB body would otherwise
/// be written twice).
pub fn allocate(size: usize) -> *mut u8 {
    let mut buffer = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    buffer.as_mut_ptr()
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> Result<u64, Status> {
    let mut t = 0u64;
    // SAFETY: the host writes one u64 through a valid pointer.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// Makes the host call the current root context's tick every `period_ms`.
pub fn set_tick_period(period_ms: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_tick_period_milliseconds(period_ms) })
}

/// Up to `max` bytes of a buffer, from its start (`None`: empty or absent).
pub fn buffer(kind: Buffer, max: usize) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host writes a pointer and a size through valid pointers.
    match status(unsafe { proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size) }) {
        Ok(()) => Ok(take(data, size)),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the first `size` bytes of a buffer with `data`.
pub fn set_buffer(kind: Buffer, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: `data` is valid for its length during the call; the host copies it.
    status(unsafe { proxy_set_buffer_bytes(kind as u32, 0, size, data.as_ptr(), data.len()) })
}

/// A header map as the host serializes it (see `flow::HeadFields::pick_serialized`).
pub fn header_map(kind: Map) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `buffer`.
    status(unsafe { proxy_get_header_map_pairs(kind as u32, &mut data, &mut size) })?;
    Ok(take(data, size).unwrap_or_default())
}

/// One header's value (`None` when absent; Envoy answers the first of several).
pub fn header(kind: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: `name` is valid for its length; the out-parameters are valid.
    let code = unsafe {
        proxy_get_header_map_value(kind as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status(code) {
        Ok(()) => Ok(Some(take(data, size).unwrap_or_default())),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets (`Some`) or removes (`None`) a header.
pub fn set_header(kind: Map, name: &str, value: Option<&str>) -> Result<(), Status> {
    // SAFETY: both strings are valid for their lengths during the call.
    status(unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(
                kind as u32,
                name.as_ptr(),
                name.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => proxy_remove_header_map_value(kind as u32, name.as_ptr(), name.len()),
        }
    })
}

/// A property by its path segments (`None` when it does not exist). A string comes
/// back as its bytes, anything else as the host serializes it.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let joined = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `header`.
    let code = unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) };
    match status(code) {
        Ok(()) => Ok(take(data, size)),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets a one-segment property of the current request (filter state `wasm.<name>`).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: both are valid for their lengths; the host copies what it keeps.
    status(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// A shared-data key's value and CAS version (both `None` when it does not exist).
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: as in `header`.
    let code =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status(code) {
        Ok(()) => Ok((Some(take(data, size).unwrap_or_default()), Some(cas))),
        Err(Status::NotFound) => Ok((None, None)),
        Err(e) => Err(e),
    }
}

/// Writes a shared-data key; with `cas`, only if it is still at that version (the host
/// checks CAS only for keys that exist).
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    // SAFETY: both are valid for their lengths during the call.
    status(unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

/// Lets the current request go on (`proxy_continue_stream` of the request).
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_continue_stream(0) })
}

/// Answers the current request locally.
pub fn send_response(
    status_code: u32,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<(), Status> {
    let headers = serialize_map(headers);
    // SAFETY: every pointer is valid for its length during the call.
    status(unsafe {
        proxy_send_local_response(
            status_code,
            null_mut(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Starts a callout to `cluster`; its answer arrives later under the returned token.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    timeout_ms: u32,
) -> Result<u32, Status> {
    let headers = serialize_map(headers);
    let trailers = serialize_map(&[]);
    let mut token = 0u32;
    // SAFETY: every pointer is valid for its length during the call; the token is
    // written through a valid pointer.
    status(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// Makes context `id` the one later host calls act on.
pub fn set_effective_context(id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_effective_context(id) })
}

/// Defines a metric; returns its id.
pub fn define_metric(kind: Metric, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: `name` is valid for its length; `id` is a valid out-parameter.
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds `by` to a metric.
pub fn increment_metric(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_increment_metric(id, by) })
}

/// The proxy-wasm serialization of a header map: a u32 count, a u32 name and value
/// length per pair, then each name and value followed by a NUL (little endian).
fn serialize_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(n, v)| 10 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The `log` crate's records, to Envoy's log (which applies its own level on top).
pub struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => 2,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        let message = record.args().to_string();
        // SAFETY: `message` is valid for its length during the call.
        let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    fn flush(&self) {}
}
