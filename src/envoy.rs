//! The host layer: proxy-wasm contexts for Envoy (wasm32 only).
//!
//! It does three things and nothing else: parse the configuration once in
//! `on_configure` and share it with every request; translate Envoy callbacks into
//! [`Event`]s for the pure [`Flow`] (data role) or [`control::handle`] (control role);
//! implement [`Host`] with proxy-wasm calls, turning `Status` into [`HostError`].
//! All decisions live in the pure core.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action as WasmAction, BufferType, ContextType, LogLevel, MapType, MetricType, Status,
};

use crate::config::{Config, Role, TTL_ENV};
use crate::control;
use crate::flow::{self, Action, Ctx, Event, Flow, HeadFields};
use crate::host::{Host, HostError, Shared};
use crate::metrics::Counter;
use crate::tiers::{Callout, Response};
use crate::worker::Worker;

/// How often the root context sends pending L2 write-backs and looks for fills
/// whose owner went away. Short: a write-back waits for it.
const ROOT_TICK: Duration = Duration::from_millis(50);

proxy_wasm::main! {{
    // Envoy applies its own log level on top; ours only bounds what is sent to it.
    proxy_wasm::set_log_level(LogLevel::Debug);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root { id, plugin: None, worker: Rc::new(RefCell::new(Worker::default())) })
    });
}}

/// What every request context of one plugin shares: the parsed configuration and
/// the ids of the counters defined for it.
struct Plugin {
    config: Config,
    metrics: Vec<u32>,
}

/// One per plugin and worker VM: the configuration, and the state the worker's
/// requests share (fills in flight, circuit breakers).
struct Root {
    id: u32,
    plugin: Option<Rc<Plugin>>,
    worker: Rc<RefCell<Worker>>,
}

impl Root {
    fn with_ctx(&self, f: impl for<'h> FnOnce(&Ctx<'_, EnvoyHost<'h>>)) {
        if let Some(plugin) = &self.plugin {
            let host = EnvoyHost {
                metrics: &plugin.metrics,
            };
            f(&Ctx::new(&host, &plugin.config, &self.worker, self.id));
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let response = callout_response(num_headers, body_size);
        self.with_ctx(|ctx| flow::on_root_callout(token_id, response, ctx));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let env_ttl = std::env::var(TTL_ENV).ok();
        let config = match Config::parse(&raw, env_ttl.as_deref()) {
            Ok(config) => config,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let mut metrics = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            match hostcalls::define_metric(MetricType::Counter, counter.name()) {
                Ok(id) => metrics.push(id),
                Err(_) => {
                    log::error!(
                        "ibex_directive: could not define counter {}",
                        counter.name()
                    );
                    return false;
                }
            }
        }
        log::info!(
            "ibex_directive: configured role={:?} ttl={}s negative_ttl={}s failure_mode={:?}",
            config.role,
            config.ttl_seconds,
            config.negative_ttl_seconds,
            config.failure_mode
        );
        if config.role == Role::Data {
            self.set_tick_period(ROOT_TICK);
        }
        self.plugin = Some(Rc::new(Plugin { config, metrics }));
        true
    }

    fn on_tick(&mut self) {
        // A closure, not the fn item: only a closure is generic over the host's lifetime.
        #[allow(clippy::redundant_closure)]
        self.with_ctx(|ctx| flow::on_root_tick(ctx));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(match plugin.config.role {
            Role::Data => Box::new(DataFilter {
                id: context_id,
                plugin,
                worker: self.worker.clone(),
                flow: Some(Flow::new()),
            }),
            Role::Control => Box::new(ControlFilter { plugin }),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Host calls of one request context.
struct EnvoyHost<'a> {
    metrics: &'a [u32],
}

fn host_error(status: Status) -> HostError {
    match status {
        Status::CasMismatch => HostError::CasMismatch,
        Status::NotFound => HostError::NotFound,
        Status::BadArgument => HostError::BadArgument,
        _ => HostError::Failed,
    }
}

impl Host for EnvoyHost<'_> {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn shared_get(&self, key: &str) -> Result<Shared, HostError> {
        hostcalls::get_shared_data(key).map_err(host_error)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(host_error)
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, HostError> {
        let mut headers = vec![
            (":method", call.method),
            (":path", call.path.as_str()),
            (":authority", call.authority.as_str()),
        ];
        headers.extend_from_slice(call.headers);
        if let Some(authorization) = &call.authorization {
            headers.push(("authorization", authorization.expose().as_str()));
        }
        if let Some(trace) = &call.traceparent {
            headers.push(("traceparent", trace.as_str()));
        }
        hostcalls::dispatch_http_call(
            &call.cluster,
            headers,
            call.body.as_ref().map(|b| b.expose().as_slice()),
            vec![],
            Duration::from_millis(call.timeout_ms),
        )
        .map_err(host_error)
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(host_error)
    }

    fn replace_request_body(&self, old_len: usize, body: &[u8]) -> Result<(), HostError> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, old_len, body).map_err(host_error)
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).map_err(host_error)
    }

    fn send_json_reply(&self, status: u16, body: &str) -> Result<(), HostError> {
        hostcalls::send_http_response(
            u32::from(status),
            vec![("content-type", "application/json")],
            Some(body.as_bytes()),
        )
        .map_err(host_error)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(host_error)
    }

    fn switch_to(&self, context_id: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context_id).map_err(host_error)
    }

    fn count(&self, counter: Counter) {
        if let Some(id) = self.metrics.get(counter as usize) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        // Envoy answers Ok, NotFound (mapped to `None`), SerializationFailure or
        // InternalFailure here, which the SDK all returns: nothing it would panic on.
        hostcalls::get_property(path.to_vec()).map_err(host_error)
    }

    fn record_audit(&self, fields: &crate::audit::Fields) -> Result<(), HostError> {
        for (name, value) in [
            (AUDIT_AGENT_ID, fields.agent_id.as_str()),
            (AUDIT_VERSION, fields.directive_version.as_str()),
            (AUDIT_TIER, fields.tier),
            (AUDIT_OUTCOME, fields.outcome.as_str()),
        ] {
            set_property(name, value.as_bytes())?;
        }
        Ok(())
    }
}

/// Filter-state names of the audit fields. Envoy keeps a wasm property `p` as filter
/// state `wasm.p`, which access logs print with `%FILTER_STATE(wasm.ibex.tier:PLAIN)%`.
/// (SPEC §7 says dynamic metadata; a wasm filter cannot write that in Envoy 1.40.)
const AUDIT_AGENT_ID: &str = "ibex.agent_id";
const AUDIT_VERSION: &str = "ibex.directive_version";
const AUDIT_TIER: &str = "ibex.tier";
const AUDIT_OUTCOME: &str = "ibex.outcome";

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
}

/// The request headers as the host serializes them, or `None` when the call fails.
fn request_header_map() -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a size into the two out-parameters. The
    // buffer it points at was allocated in this VM through `proxy_on_memory_allocate`
    // (the SDK's export: a boxed slice of exactly `size` bytes), so it is ours
    // to take back as a `Vec` of that length and capacity, exactly as the SDK does.
    let status = unsafe {
        proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size)
    };
    if status != 0 {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: see above.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Sets a one-segment property of the current request. The SDK's `set_property`
/// panics on any status but Ok, which would take the worker's VM down for an audit
/// field; here any other status is an error.
fn set_property(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: both pointers are valid for their lengths for the duration of the
    // call; the host copies what it keeps.
    let status =
        unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    match status {
        0 => Ok(()),
        _ => Err(HostError::NotFound),
    }
}

fn wasm_action(action: Action) -> WasmAction {
    match action {
        Action::Continue => WasmAction::Continue,
        Action::Pause => WasmAction::Pause,
    }
}

/// The answer of the callout being delivered (no `:status`: it failed or timed out).
///
/// Envoy reports a failed callout (reset, timeout, even after response headers had
/// arrived) with no headers, and then has no response map at all: reading it would
/// make the SDK panic on the `BadArgument`, so a callout without headers is read as
/// failed without asking.
fn callout_response(num_headers: usize, body_size: usize) -> Response {
    if num_headers == 0 {
        return Response::default();
    }
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u16>().ok());
    let body = if status.is_some() {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Response { status, body }
}

/// Data role: one per request, owning that request's [`Flow`].
struct DataFilter {
    id: u32,
    plugin: Rc<Plugin>,
    worker: Rc<RefCell<Worker>>,
    /// `None` only while an event is being processed (the flow is moved through it).
    flow: Option<Flow>,
}

impl DataFilter {
    fn step(&mut self, event: Event<'_>) -> Action {
        let host = EnvoyHost {
            metrics: &self.plugin.metrics,
        };
        let ctx = Ctx::new(&host, &self.plugin.config, &self.worker, self.id);
        let flow = self.flow.take().unwrap_or_default();
        let (next, action) = flow.on_event(event, &ctx);
        self.flow = Some(next);
        action
    }
}

impl Drop for DataFilter {
    // The request is over (or its client went away): no fill may wait on it or try
    // to resume it any more.
    fn drop(&mut self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.forget(self.id);
        }
    }
}

impl Context for DataFilter {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let response = callout_response(num_headers, body_size);
        self.step(Event::Callout {
            token: token_id,
            response,
        });
    }
}

impl HttpContext for DataFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> WasmAction {
        // One host call for all headers: every call that returns data re-enters the VM
        // to allocate, so four single-header reads cost several times more. Read
        // from the host's serialized map in place: the SDK would make two heap
        // strings of every header to keep five of them.
        let config = &self.plugin.config;
        let key_header = config.agent_source.key_header();
        let fields = request_header_map()
            .and_then(|raw| HeadFields::pick_serialized(&raw, &config.agent_header, key_header))
            .unwrap_or_else(|| {
                // Not the layout the ABI promises: the SDK's reader (bytes, not
                // strings: its string variant panics on a value that is not UTF-8).
                HeadFields::pick(
                    self.get_http_request_headers_bytes(),
                    &config.agent_header,
                    key_header,
                )
            });
        wasm_action(self.step(Event::Headers {
            head: &fields,
            end_of_stream,
        }))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        wasm_action(self.step(Event::Body {
            size: body_size,
            end_of_stream,
        }))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> WasmAction {
        wasm_action(self.step(Event::Trailers))
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> WasmAction {
        if self.plugin.config.audit_response_header {
            let version = self
                .worker
                .try_borrow()
                .ok()
                .and_then(|w| w.sent_version(self.id).map(str::to_string));
            // Set, not added: an upstream's own header of that name must not reach
            // the client beside (or, with no record, instead of) ours. Response
            // headers are modifiable in this callback, so the host answers Ok (the
            // SDK would panic on anything else).
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                AUDIT_RESPONSE_HEADER,
                version.as_deref(),
            );
        }
        WasmAction::Continue
    }
}

/// Response header naming the directive version the request was forwarded with
/// (`audit.response_header`).
const AUDIT_RESPONSE_HEADER: &str = "x-ibex-directive-version";

/// Control role: answers invalidation requests locally.
struct ControlFilter {
    plugin: Rc<Plugin>,
}

impl Context for ControlFilter {}

impl HttpContext for ControlFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> WasmAction {
        let host = EnvoyHost {
            metrics: &self.plugin.metrics,
        };
        // Bytes, not strings: the SDK's string variant panics on a value that is not
        // UTF-8. A lossy value matches no method, path or token, so it is refused.
        let header = |name| {
            self.get_http_request_header_bytes(name)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let method = header(":method");
        let path = header(":path");
        let auth = header("authorization");
        let reply = control::handle(
            method.as_deref(),
            path.as_deref(),
            auth.as_deref(),
            &host,
            &self.plugin.config,
        );
        let body = (!reply.body.is_empty()).then_some(reply.body.as_bytes());
        let headers = if body.is_some() {
            vec![("content-type", "application/json")]
        } else {
            vec![]
        };
        if hostcalls::send_http_response(u32::from(reply.status), headers, body).is_err() {
            log::warn!("ibex_directive: control reply failed");
        }
        WasmAction::Pause
    }
}
