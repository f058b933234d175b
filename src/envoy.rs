//! The host layer: the proxy-wasm callbacks Envoy calls, exported for Envoy
//! (wasm32 only), and [`Host`] implemented with the host calls of [`crate::abi`].
//!
//! It does three things and nothing else: parse the configuration once in
//! `on_configure` and share it with every request; translate Envoy callbacks into
//! [`Event`]s for the pure [`Flow`] (data role) or [`control::handle`] (control role);
//! implement [`Host`], turning the ABI's status into [`HostError`]. All decisions
//! live in the pure core.
//!
//! Only the callbacks the filter uses are exported (see `crate::abi` for why): the
//! VM start and configuration, context creation and deletion, the root's tick and
//! callout answers, and the request headers, body and trailers and the response
//! headers of each request. A context Envoy asks about that this VM does not know
//! (it was never created, or its plugin failed to configure) is refused, never let
//! through: `directive_unavailable` for a request's headers.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::abi::{self, Buffer, Map, Metric};
use crate::config::{Config, Role, TTL_ENV};
use crate::control;
use crate::flow::{self, Action, Ctx, Event, Flow, HeadFields};
use crate::host::{Host, HostError, Shared};
use crate::idmap::IdMap;
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::{Callout, Response};
use crate::worker::Worker;

/// How often the root context sends pending L2 write-backs and looks for fills
/// whose owner went away. Short: a write-back waits for it.
const ROOT_TICK_MS: u32 = 50;

/// The largest callout answer read (see `callout_response`).
const MAX_CALLOUT_BODY: usize = 16 << 20;

/// ABI `Action`s.
const CONTINUE: u32 = 0;
const PAUSE: u32 = 1;

static LOGGER: abi::Logger = abi::Logger;

thread_local! {
    /// Root contexts (one per plugin in this VM) by context id.
    static ROOTS: RefCell<IdMap<u32, Root>> = RefCell::new(IdMap::default());
    /// Request contexts by context id.
    static STREAMS: RefCell<IdMap<u32, Stream>> = RefCell::new(IdMap::default());
    /// The context each callout in flight was dispatched from, by token: the host
    /// answers every callout on the root context, and its answer belongs to the
    /// context that asked, when that still exists.
    static CALLOUTS: RefCell<IdMap<u32, u32>> = RefCell::new(IdMap::default());
    /// The context whose callback is running.
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The reactor's start: the C runtime's constructors, then our logger.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once by the host before anything else, as a wasi reactor's
    // `_initialize` must be.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    // Envoy applies its own log level on top; ours only bounds what is sent to it.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    // A panic's message may quote what it panicked on (a slice of a body, of a
    // directive): only where it happened is logged. (Clippy denies panicking code
    // outside tests; this is for what slips through, e.g. an allocation failure.)
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map_or_else(
            || "unknown".to_string(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        log::error!("ibex_directive: panic at {at}");
    }));
}

/// The ABI version this module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory for the host to write an answer into (taken back by `abi`).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    abi::allocate(size)
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(id: u32, parent: u32) {
    if parent == 0 {
        let root = Root {
            id,
            plugin: None,
            worker: Rc::new(RefCell::new(Worker::default())),
        };
        ROOTS.with(|roots| roots.borrow_mut().insert(id, root));
        return;
    }
    let stream = ROOTS.with(|roots| roots.borrow().get(&parent).and_then(|r| r.stream(id)));
    if let Some(stream) = stream {
        STREAMS.with(|streams| streams.borrow_mut().insert(id, stream));
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, size: usize) -> bool {
    ACTIVE.with(|a| a.set(root_id));
    ROOTS.with(|roots| {
        roots
            .borrow_mut()
            .get_mut(&root_id)
            .is_some_and(|root| root.configure(size))
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    ACTIVE.with(|a| a.set(root_id));
    ROOTS.with(|roots| {
        if let Some(root) = roots.borrow().get(&root_id) {
            // A closure, not the fn item: only a closure is generic over the host's lifetime.
            #[allow(clippy::redundant_closure)]
            root.with_ctx(|ctx| flow::on_root_tick(ctx));
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    _root_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    _num_trailers: usize,
) {
    let Some(owner) = CALLOUTS.with(|c| c.borrow_mut().remove(&token)) else {
        return;
    };
    if abi::set_effective_context(owner).is_err() {
        // The context that asked is gone (the host forgets it at once).
        return;
    }
    ACTIVE.with(|a| a.set(owner));
    let mut response = Some(callout_response(num_headers, body_size));
    STREAMS.with(
        |streams| match (streams.borrow_mut().get_mut(&owner), response.take()) {
            (Some(Stream::Data(filter)), Some(response)) => {
                filter.step(Event::Callout { token, response });
            }
            (None, r) => response = r,
            _ => {}
        },
    );
    if let Some(response) = response {
        ROOTS.with(|roots| {
            if let Some(root) = roots.borrow().get(&owner) {
                root.with_ctx(|ctx| flow::on_root_callout(token, response, ctx));
            }
        });
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    id: u32,
    _num_headers: usize,
    end_of_stream: bool,
) -> u32 {
    ACTIVE.with(|a| a.set(id));
    let action = STREAMS.with(|streams| match streams.borrow_mut().get_mut(&id) {
        Some(Stream::Data(filter)) => Some(filter.on_request_headers(end_of_stream)),
        Some(Stream::Control(control)) => Some(control.on_request_headers()),
        None => None,
    });
    action.unwrap_or_else(refuse_unknown)
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(id: u32, size: usize, end_of_stream: bool) -> u32 {
    ACTIVE.with(|a| a.set(id));
    STREAMS.with(|streams| match streams.borrow_mut().get_mut(&id) {
        Some(Stream::Data(filter)) => wasm_action(filter.step(Event::Body {
            size,
            end_of_stream,
        })),
        Some(Stream::Control(_)) => PAUSE,
        // Refused in its headers callback; nothing of it may pass.
        None => PAUSE,
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(id: u32, _num_trailers: usize) -> u32 {
    ACTIVE.with(|a| a.set(id));
    STREAMS.with(|streams| match streams.borrow_mut().get_mut(&id) {
        Some(Stream::Data(filter)) => wasm_action(filter.step(Event::Trailers)),
        Some(Stream::Control(_)) | None => PAUSE,
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    ACTIVE.with(|a| a.set(id));
    STREAMS.with(|streams| {
        if let Some(Stream::Data(filter)) = streams.borrow().get(&id) {
            filter.on_response_headers();
        }
    });
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(id: u32) {
    // Dropping a request's filter tells the worker it is over.
    let stream = STREAMS.with(|streams| streams.borrow_mut().remove(&id));
    if stream.is_none() {
        ROOTS.with(|roots| roots.borrow_mut().remove(&id));
    }
    drop(stream);
}

/// A request context this VM does not know: refused with the SPEC's 503, never
/// forwarded (the filter cannot tell whether it carries a directive's request).
fn refuse_unknown() -> u32 {
    let refusal = Refusal::DirectiveUnavailable;
    let body = refusal.body("x-agent-id");
    let _ = abi::send_response(
        u32::from(refusal.status()),
        &[("content-type", b"application/json")],
        body.as_bytes(),
    );
    PAUSE
}

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

    fn configure(&mut self, size: usize) -> bool {
        let raw = abi::buffer(Buffer::PluginConfiguration, size)
            .ok()
            .flatten()
            .unwrap_or_default();
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
            match abi::define_metric(Metric::Counter, counter.name()) {
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
        if config.role == Role::Data && abi::set_tick_period(ROOT_TICK_MS).is_err() {
            log::error!("ibex_directive: could not set the root tick");
            return false;
        }
        if config.role == Role::Control {
            let host = EnvoyHost { metrics: &metrics };
            if control::start_epoch(&host).is_err() {
                // Workers then serve no hot copies: slower, never less coherent.
                log::warn!("ibex_directive: could not create the L1 epoch");
            }
        }
        self.plugin = Some(Rc::new(Plugin { config, metrics }));
        true
    }

    /// The context of a new request, once the plugin is configured.
    fn stream(&self, id: u32) -> Option<Stream> {
        let plugin = self.plugin.clone()?;
        Some(match plugin.config.role {
            Role::Data => Stream::Data(DataFilter {
                id,
                plugin,
                worker: self.worker.clone(),
                flow: Some(Flow::new()),
            }),
            Role::Control => Stream::Control(ControlFilter { plugin }),
        })
    }
}

/// A request context: of the data role or the control role.
enum Stream {
    Data(DataFilter),
    Control(ControlFilter),
}

/// Host calls of one request context.
struct EnvoyHost<'a> {
    metrics: &'a [u32],
}

fn host_error(status: abi::Status) -> HostError {
    match status {
        abi::Status::CasMismatch => HostError::CasMismatch,
        abi::Status::NotFound => HostError::NotFound,
        abi::Status::BadArgument => HostError::BadArgument,
        abi::Status::Other(_) => HostError::Failed,
    }
}

impl Host for EnvoyHost<'_> {
    fn now_ms(&self) -> u64 {
        abi::now_ns().map_or(0, |ns| ns / 1_000_000)
    }

    fn shared_get(&self, key: &str) -> Result<Shared, HostError> {
        abi::shared_get(key).map_err(host_error)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        abi::shared_set(key, value, cas).map_err(host_error)
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, HostError> {
        let mut headers: Vec<(&str, &[u8])> = vec![
            (":method", call.method.as_bytes()),
            (":path", call.path.as_bytes()),
            (":authority", call.authority.as_bytes()),
        ];
        headers.extend(call.headers.iter().map(|(n, v)| (*n, v.as_bytes())));
        if let Some(authorization) = &call.authorization {
            headers.push(("authorization", authorization.expose().as_bytes()));
        }
        if let Some(trace) = &call.traceparent {
            headers.push(("traceparent", trace.as_bytes()));
        }
        let body = call
            .body
            .as_ref()
            .map_or(&[][..], |b| b.expose().as_slice());
        let timeout = u32::try_from(call.timeout_ms).unwrap_or(u32::MAX);
        let token = abi::http_call(&call.cluster, &headers, body, timeout).map_err(host_error)?;
        // Its answer belongs to the context whose callback is running (not to one a
        // fill switched to): `flow::deliver` dispatches nothing while switched.
        let owner = ACTIVE.with(Cell::get);
        CALLOUTS.with(|c| c.borrow_mut().insert(token, owner));
        Ok(token)
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        abi::buffer(Buffer::RequestBody, size)
            .map(Option::unwrap_or_default)
            .map_err(host_error)
    }

    fn replace_request_body(&self, old_len: usize, body: &[u8]) -> Result<(), HostError> {
        abi::set_buffer(Buffer::RequestBody, old_len, body).map_err(host_error)
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        abi::set_header(Map::Request, name, value).map_err(host_error)
    }

    fn send_json_reply(&self, status: u16, body: &str) -> Result<(), HostError> {
        abi::send_response(
            u32::from(status),
            &[("content-type", b"application/json")],
            body.as_bytes(),
        )
        .map_err(host_error)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        abi::resume_request().map_err(host_error)
    }

    fn switch_to(&self, context_id: u32) -> Result<(), HostError> {
        abi::set_effective_context(context_id).map_err(host_error)
    }

    fn count(&self, counter: Counter) {
        if let Some(id) = self.metrics.get(counter as usize) {
            let _ = abi::increment_metric(*id, 1);
        }
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        abi::property(path).map_err(host_error)
    }

    fn record_audit(
        &self,
        fields: &crate::audit::Fields,
        layout: crate::audit::Layout,
    ) -> Result<(), HostError> {
        if layout == crate::audit::Layout::Combined {
            return abi::set_property(AUDIT_COMBINED, fields.combined().as_bytes())
                .map_err(host_error);
        }
        for (name, value) in [
            (AUDIT_AGENT_ID, fields.agent_id.as_str()),
            (AUDIT_VERSION, fields.directive_version.as_str()),
            (AUDIT_TIER, fields.tier),
            (AUDIT_OUTCOME, fields.outcome.as_str()),
        ] {
            abi::set_property(name, value.as_bytes()).map_err(host_error)?;
        }
        Ok(())
    }
}

/// Filter-state names of the audit record. Envoy keeps a wasm property `p` as filter
/// state `wasm.p`, which access logs print with `%FILTER_STATE(wasm.ibex.audit:PLAIN)%`.
/// (SPEC §7 says dynamic metadata; a wasm filter cannot write that in Envoy 1.40.)
const AUDIT_COMBINED: &str = "ibex.audit";
const AUDIT_AGENT_ID: &str = "ibex.agent_id";
const AUDIT_VERSION: &str = "ibex.directive_version";
const AUDIT_TIER: &str = "ibex.tier";
const AUDIT_OUTCOME: &str = "ibex.outcome";

fn wasm_action(action: Action) -> u32 {
    match action {
        Action::Continue => CONTINUE,
        Action::Pause => PAUSE,
    }
}

/// The answer of the callout being delivered (no `:status`: it failed or timed out).
///
/// Envoy reports a failed callout (reset, timeout, even after response headers had
/// arrived) with no headers, and then has no response map at all, so a callout
/// without headers is read as failed without asking.
fn callout_response(num_headers: usize, body_size: usize) -> Response {
    // Nothing the filter asks for is that large (a directive in a JSON answer): a
    // broken or hostile front or store must not grow the VM's memory, which never
    // shrinks, or abort it past 2 GiB. Such an answer is a failed callout.
    if num_headers == 0 || body_size > MAX_CALLOUT_BODY {
        return Response::default();
    }
    let status = abi::header(Map::CallResponse, ":status")
        .ok()
        .flatten()
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok());
    let body = if status.is_some() {
        abi::buffer(Buffer::CallResponseBody, body_size)
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

    fn on_request_headers(&mut self, end_of_stream: bool) -> u32 {
        // One host call for all headers: every call that returns data re-enters the VM
        // to allocate, so four single-header reads cost several times more. Read
        // from the host's serialized map in place, copying only the fields kept.
        let config = &self.plugin.config;
        let key_header = config.agent_source.key_header();
        let fields = abi::header_map(Map::Request)
            .ok()
            .and_then(|raw| HeadFields::pick_serialized(&raw, &config.agent_header, key_header))
            // Not the map the ABI promises: nothing about the request can be known.
            .unwrap_or_else(HeadFields::unreadable);
        wasm_action(self.step(Event::Headers {
            head: &fields,
            end_of_stream,
        }))
    }

    fn on_response_headers(&self) {
        if self.plugin.config.audit_response_header {
            let version = self
                .worker
                .try_borrow()
                .ok()
                .and_then(|w| w.sent_version(self.id).map(str::to_string));
            // Set, not added: an upstream's own header of that name must not reach
            // the client beside (or, with no record, instead of) ours.
            let _ = abi::set_header(Map::Response, AUDIT_RESPONSE_HEADER, version.as_deref());
        }
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

/// Response header naming the directive version the request was forwarded with
/// (`audit.response_header`).
const AUDIT_RESPONSE_HEADER: &str = "x-ibex-directive-version";

/// Control role: answers invalidation requests locally.
struct ControlFilter {
    plugin: Rc<Plugin>,
}

impl ControlFilter {
    fn on_request_headers(&self) -> u32 {
        let host = EnvoyHost {
            metrics: &self.plugin.metrics,
        };
        // A value that is not UTF-8 matches no method, path or token: it is refused.
        let header = |name| {
            abi::header(Map::Request, name)
                .ok()
                .flatten()
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
        let headers: &[(&str, &[u8])] = if reply.body.is_empty() {
            &[]
        } else {
            &[("content-type", b"application/json")]
        };
        if abi::send_response(u32::from(reply.status), headers, reply.body.as_bytes()).is_err() {
            log::warn!("ibex_directive: control reply failed");
        }
        PAUSE
    }
}
