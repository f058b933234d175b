//! Callgrind driver of whole requests: `request PATH ITERATIONS` runs ITERATIONS
//! requests through the filter's pure flow, natively, as Envoy's host layer does
//! (context created, headers from a serialized header map, the body, context
//! deleted), each an L1 hit of one agent whose directive is in shared data, on the
//! chat path (`/v1/chat/completions`) or any other. Under
//! `valgrind --tool=callgrind --toggle-collect='request::run*'` it counts what the
//! filter's own code costs per request, by function, without Envoy and V8 around
//! it (`bench/instructions.py` counts those).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use ibex_directive::audit::{Fields, Layout, Version};
use ibex_directive::config::Config;
use ibex_directive::entry::{self, Entry, Kind};
use ibex_directive::flow::{Ctx, Event, Flow, HeadFields};
use ibex_directive::host::{Host, HostError, Shared};
use ibex_directive::inject::Format;
use ibex_directive::metrics::Counter;
use ibex_directive::tiers::Callout;
use ibex_directive::worker::Worker;
use ibex_directive_micro::body;

const CONFIG: &str = r#"{"role":"data","agent":{"header":"x-agent-id","missing":"reject"},
"cache":{"ttl_seconds":3600},"redis":{"cluster":"r","authority":"r","dialect":"upstash","token":"t",
"key_prefix":"directive:"},"store":{"cluster":"s","authority":"s"},"debug_headers":false}"#;
const AGENT: &str = "a1000000-0000-4000-8000-000000000000";

/// Just enough host: shared data, one request's body, counters thrown away.
#[derive(Default)]
struct Bench {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    body: RefCell<Vec<u8>>,
    sent: Cell<usize>,
}

impl Host for Bench {
    fn now_ms(&self) -> u64 {
        1_800_000_000_000
    }
    fn shared_get(&self, key: &str) -> Result<Shared, HostError> {
        Ok(match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }
    fn shared_set(&self, key: &str, value: &[u8], _cas: Option<u32>) -> Result<(), HostError> {
        let mut map = self.shared.borrow_mut();
        let cas = map.get(key).map_or(1, |(_, c)| c + 1);
        map.insert(key.to_string(), (value.to_vec(), cas));
        Ok(())
    }
    fn dispatch(&self, _call: &Callout) -> Result<u32, HostError> {
        Err(HostError::Failed)
    }
    fn request_body(&self, _size: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.body.borrow().clone())
    }
    fn replace_request_body(&self, _old_len: usize, body: &[u8]) -> Result<(), HostError> {
        self.sent.set(self.sent.get() + body.len());
        Ok(())
    }
    fn set_request_header(&self, _name: &str, _value: Option<&str>) -> Result<(), HostError> {
        Ok(())
    }
    fn send_json_reply(&self, status: u16, _body: &str) -> Result<(), HostError> {
        eprintln!("refused with {status}");
        std::process::exit(1);
    }
    fn resume_request(&self) -> Result<(), HostError> {
        Ok(())
    }
    fn switch_to(&self, _context_id: u32) -> Result<(), HostError> {
        Ok(())
    }
    fn count(&self, _counter: Counter) {}
    fn property(&self, _path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        Ok(None)
    }
    fn record_audit(&self, fields: &Fields, _layout: Layout) -> Result<(), HostError> {
        std::hint::black_box(fields.combined());
        Ok(())
    }
}

/// Envoy's serialized header map (proxy-wasm layout) of a request like wrk's.
fn header_map(path: &str, body_len: usize) -> Vec<u8> {
    let len = body_len.to_string();
    let pairs: [(&str, &str); 8] = [
        (":authority", "127.0.0.1:10000"),
        (":path", path),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("x-agent-id", AGENT),
        ("content-length", &len),
        ("x-forwarded-proto", "http"),
    ];
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (n, v) in pairs {
        out.extend((n.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend(n.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

#[inline(never)]
fn run(
    host: &Bench,
    config: &Config,
    worker: &RefCell<Worker>,
    headers: &[u8],
    size: usize,
    n: u32,
) {
    for id in 2..n + 2 {
        let head = HeadFields::pick_serialized(headers, &config.agent_header, None)
            .unwrap_or_else(HeadFields::unreadable);
        let ctx = Ctx::new(host, config, worker, id);
        let (flow, _) = Flow::new().on_event(
            Event::Headers {
                head: &head,
                end_of_stream: false,
            },
            &ctx,
        );
        let (flow, _) = flow.on_event(
            Event::Body {
                size,
                end_of_stream: true,
            },
            &ctx,
        );
        drop(flow);
        worker.borrow_mut().forget(id);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(Ok(n))) = (args.get(1), args.get(2).map(|s| s.parse::<u32>())) else {
        eprintln!("usage: request PATH ITERATIONS");
        std::process::exit(2);
    };
    let config = match Config::parse(CONFIG.as_bytes(), None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let host = Bench::default();
    let escaped = ibex_directive_micro::ESCAPED_DIRECTIVE;
    let agent = ibex_directive::agent::AgentId::parse(AGENT).expect("agent id");
    let e = Entry {
        kind: Kind::Present,
        fresh_until_ms: u64::MAX / 2,
        generation: 0,
        escaped: ibex_wire::Redacted::new(escaped),
        version: Version::from_bytes([7; 16]),
    };
    let _ = host.shared_set(&entry::key_for(&agent), &e.encode(), None);
    let _ = host.shared_set(entry::EPOCH_KEY, &5u64.to_le_bytes(), None);
    let b = body(Format::OpenAiChat, 1024);
    *host.body.borrow_mut() = b.clone();
    let headers = header_map(path, b.len());
    let worker = RefCell::new(Worker::default());
    run(&host, &config, &worker, &headers, b.len(), n);
    println!("{}", host.sent.get());
}
