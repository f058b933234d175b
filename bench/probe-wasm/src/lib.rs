//! Host-call probe (see Cargo.toml): the plugin configuration is a comma-separated
//! list of operations, each done once per request, in order:
//!
//! | op | host call |
//! |---|---|
//! | `headers` | all request headers in one call (`proxy_get_header_map_pairs`) |
//! | `header` | one request header (`x-agent-id`) |
//! | `time` | `proxy_get_current_time_nanoseconds` |
//! | `counter` | `proxy_increment_metric` on a counter |
//! | `metric` | `proxy_get_metric` of a gauge |
//! | `shared` | `proxy_get_shared_data` of a 350-byte value |
//! | `shared8` | `proxy_get_shared_data` of an 8-byte value |
//! | `property` | `proxy_set_property` of a short filter-state value |
//! | `unset` | removes the `content-length` request header |
//! | `buffer` | pauses body callbacks until the end of the body (Envoy buffers it) |
//! | `rewrite` | with `buffer`: reads the whole body and writes it back 64 bytes longer, and removes `content-length` in the headers callback (as a splice does) |
//!
//! `op*N` repeats an op N times. The results are thrown away; only the calls' cost
//! matters. Never used outside `make bench`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ProbeRoot { plan: Rc::new(Plan::default()) })
    });
}}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Headers,
    Header,
    Time,
    Counter,
    Metric,
    Shared,
    Shared8,
    Property(usize),
    Unset,
}

const PROPERTY_NAMES: [&str; 10] = [
    "probe.f0", "probe.f1", "probe.f2", "probe.f3", "probe.f4", "probe.f5", "probe.f6", "probe.f7",
    "probe.f8", "probe.f9",
];

#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    buffer: bool,
    rewrite: bool,
    counter: u32,
    gauge: u32,
}

struct ProbeRoot {
    plan: Rc<Plan>,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        let mut plan = Plan::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            // `op*N`: the op N times in a row, to lift a cheap call's price above the
            // noise of one request.
            let (name, times) = match item.split_once('*') {
                Some((name, n)) => match n.parse::<usize>() {
                    Ok(n) => (name, n),
                    Err(_) => return false,
                },
                None => (item, 1),
            };
            let op = match name {
                "headers" => Op::Headers,
                "header" => Op::Header,
                "time" => Op::Time,
                "counter" => Op::Counter,
                "metric" => Op::Metric,
                "shared" => Op::Shared,
                "shared8" => Op::Shared8,
                "property" => Op::Property(0),
                "unset" => Op::Unset,
                "buffer" => {
                    plan.buffer = true;
                    continue;
                }
                "rewrite" => {
                    plan.rewrite = true;
                    continue;
                }
                _ => return false,
            };
            for i in 0..times {
                plan.ops.push(match op {
                    Op::Property(_) => Op::Property(i),
                    op => op,
                });
            }
        }
        plan.counter = hostcalls::define_metric(MetricType::Counter, "probe.counter").unwrap_or(0);
        plan.gauge = hostcalls::define_metric(MetricType::Gauge, "probe.gauge").unwrap_or(0);
        let _ = hostcalls::set_shared_data("probe.value", Some(&[b'x'; 350]), None);
        let _ = hostcalls::set_shared_data("probe.small", Some(&[b'x'; 8]), None);
        self.plan = Rc::new(plan);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            plan: self.plan.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    plan: Rc<Plan>,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.plan.rewrite {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "content-length", None);
        }
        for op in &self.plan.ops {
            match *op {
                Op::Headers => {
                    let _ = self.get_http_request_headers_bytes();
                }
                Op::Header => {
                    let _ = self.get_http_request_header_bytes("x-agent-id");
                }
                Op::Time => {
                    let _ = hostcalls::get_current_time();
                }
                Op::Counter => {
                    let _ = hostcalls::increment_metric(self.plan.counter, 1);
                }
                Op::Metric => {
                    let _ = hostcalls::get_metric(self.plan.gauge);
                }
                Op::Shared => {
                    let _ = hostcalls::get_shared_data("probe.value");
                }
                Op::Shared8 => {
                    let _ = hostcalls::get_shared_data("probe.small");
                }
                Op::Property(n) => {
                    // A new filter-state object each, as the filter's four audit fields are.
                    let name = PROPERTY_NAMES[n % PROPERTY_NAMES.len()];
                    let _ = hostcalls::set_property(vec![name], Some(b"value-of-a-field"));
                }
                Op::Unset => {
                    let _ = hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        "content-length",
                        None,
                    );
                }
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.plan.buffer {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if self.plan.rewrite {
            if let Ok(Some(mut body)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            {
                body.extend_from_slice(&[b' '; 64]);
                let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, &body);
            }
        }
        Action::Continue
    }
}
