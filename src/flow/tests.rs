//! The request flow end to end over an in-memory host: every tier, coalescing,
//! invalidation races, breakers, stale-if-error and delivery to participants.

use super::*;
use crate::breaker::{BREAKER_COOL_OFF_MS, BREAKER_THRESHOLD};
use crate::entry::{Entry, Kind};
use crate::host::fake::{FakeHost, SharedData};
use crate::worker::Tier;

const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const INJECTED: &str = r#"{"model":"m","messages":[{"role":"system","content":"Be \"terse\"."},{"role":"user","content":"hi"}]}"#;
const ROOT: u32 = 99;

fn config(extra: &str) -> Config {
    Config::parse(
        format!(r#"{{"debug_headers":true{extra}}}"#).as_bytes(),
        None,
    )
    .unwrap()
}

fn ok(body: &str) -> Response {
    Response {
        status: Some(200),
        body: body.as_bytes().to_vec(),
    }
}

fn redis_hit(text: &str) -> Response {
    ok(&format!("${}\r\n{}\r\n", text.len(), text))
}

fn redis_miss() -> Response {
    ok("$-1\r\n")
}

fn store_answer(content: Option<&str>) -> Response {
    ok(&serde_json::json!({"agent_id": AGENT, "content": content}).to_string())
}

fn failed() -> Response {
    Response::default()
}

/// One fake worker: its host (request contexts), its shared state, the config.
struct W {
    host: FakeHost,
    worker: RefCell<Worker>,
    config: Config,
}

impl W {
    fn new(shared: &SharedData, config: Config) -> W {
        let host = FakeHost::with_shared(shared.clone());
        host.add_request(ROOT, b"");
        W {
            host,
            worker: RefCell::new(Worker::default()),
            config,
        }
    }

    fn ctx(&self, id: u32) -> Ctx<'_, FakeHost> {
        self.host.current.set(id);
        Ctx::new(&self.host, &self.config, &self.worker, id)
    }

    fn ev(&self, id: u32, flow: Flow, event: Event<'_>) -> (Flow, Action) {
        flow.on_event(event, &self.ctx(id))
    }

    fn headers_with(&self, id: u32, (head, end_of_stream): (HeadFields, bool)) -> (Flow, Action) {
        if !self.host.requests.borrow().contains_key(&id) || id == 1 {
            self.host.add_request(id, BODY.as_bytes());
        }
        let event = Event::Headers {
            head: &head,
            end_of_stream,
        };
        self.ev(id, Flow::new(), event)
    }

    fn headers(&self, id: u32) -> (Flow, Action) {
        self.headers_with(id, head(Some(AGENT)))
    }

    /// The last callout answers, in context `id` (the one that dispatched it).
    fn answer(&self, id: u32, flow: Flow, response: Response) -> (Flow, Action) {
        let (token, _) = self.host.last_callout();
        self.ev(id, flow, Event::Callout { token, response })
    }

    fn body_end(&self, id: u32, flow: Flow) -> (Flow, Action) {
        let size = self.host.req(id).body.len();
        self.ev(
            id,
            flow,
            Event::Body {
                size,
                end_of_stream: true,
            },
        )
    }

    fn body(&self, id: u32) -> String {
        String::from_utf8(self.host.req(id).body.clone()).unwrap()
    }

    fn tier(&self, id: u32) -> Option<String> {
        self.host.req(id).headers.get(DEBUG_HEADER).cloned()
    }

    fn reply_status(&self, id: u32) -> Option<u16> {
        self.host.req(id).reply.as_ref().map(|r| r.0)
    }

    /// Headers, every callout answered in order by `answers`, then the body.
    fn run(&self, id: u32, answers: Vec<Response>) -> Flow {
        let (mut flow, mut action) = self.headers(id);
        for answer in answers {
            assert_eq!(action, Action::Pause, "headers are held while a fill runs");
            let (f, _) = self.answer(id, flow, answer);
            flow = f;
            action = if flow.is_waiting() {
                Action::Pause
            } else {
                Action::Continue
            };
        }
        if matches!(flow.state, State::Replied) {
            return flow;
        }
        let (flow, action) = self.body_end(id, flow);
        if !matches!(flow.state, State::Replied) {
            assert_eq!(action, Action::Continue);
        }
        flow
    }
}

/// Headers of a chat request with a body, and whether it ends with them.
fn head(agent: Option<&str>) -> (HeadFields, bool) {
    let fields = HeadFields {
        path: Some("/v1/chat/completions".into()),
        agent: agent.map(String::from),
        ..Default::default()
    };
    (fields, false)
}

#[test]
fn cold_agent_goes_through_every_tier_and_is_cached_in_l1_and_l2() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let flow = w.run(1, vec![redis_miss(), store_answer(Some("Be \"terse\"."))]);
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(
        w.host.callouts.borrow().len(),
        2,
        "the write-back waits for the root"
    );
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(w.body(1), INJECTED);
    assert_eq!(w.tier(1).as_deref(), Some("store"));
    assert_eq!(w.host.req(1).resumed, 1);
    let calls = w.host.callouts.borrow().clone();
    assert_eq!(calls.len(), 3, "L2 get, L3 get, L2 write");
    assert_eq!(calls[0].1.cluster, "ibex_redis");
    assert_eq!(calls[1].1.cluster, "ibex_store");
    assert!(calls[2].1.path.ends_with(&format!(
        "/2/directive:{AGENT}/{}/60",
        ibex_wire::flush_marker_for("directive:", &format!("directive:{AGENT}"))
    )));
    assert_eq!(
        calls[2].1.body.as_ref().map(|b| b.expose().as_slice()),
        Some(&b"Be \"terse\"."[..])
    );
    for c in [
        Counter::L1Miss,
        Counter::L2Miss,
        Counter::L3Hit,
        Counter::L2Write,
        Counter::Injected,
    ] {
        assert_eq!(w.host.counter(c), 1, "{c:?}");
    }
    assert!(w.worker.borrow().is_idle());

    // Next request, on another worker: served from L1, no callout.
    let w2 = W::new(&shared, config(""));
    let flow = w2.run(1, vec![]);
    assert!(matches!(flow.state, State::Forward));
    assert!(w2.host.callouts.borrow().is_empty());
    assert_eq!(w2.host.counter(Counter::L1Hit), 1);
    assert_eq!(w2.body(1), INJECTED);
    assert_eq!(w2.tier(1).as_deref(), Some("local"));
}

/// The same flow over the `upstash` dialect: the tiers' requests and readers change,
/// nothing else does.
#[test]
fn the_upstash_dialect_fills_and_writes_back_like_webdis() {
    let upstash = r#","redis":{"dialect":"upstash","token":"t0k"}"#;
    let shared = SharedData::default();
    let w = W::new(&shared, config(upstash));
    let miss = ok(r#"{"result":null}"#);
    let flow = w.run(1, vec![miss, store_answer(Some("Be \"terse\"."))]);
    assert!(matches!(flow.state, State::Forward));
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(w.body(1), INJECTED);
    let calls = w.host.callouts.borrow().clone();
    assert_eq!(calls.len(), 3, "L2 get, L3 get, L2 write");
    let write = &calls[2].1;
    assert_eq!((write.method, write.path.as_str()), ("POST", "/"));
    let args: Vec<String> = serde_json::from_slice(write.body.as_ref().unwrap().expose()).unwrap();
    assert_eq!(args[6], "Be \"terse\".");
    let token = calls[2].0;
    on_root_callout(token, ok(r#"{"result":0}"#), &w.ctx(ROOT));
    assert_eq!(w.host.counter(Counter::L2WriteSkipped), 1);

    // Another worker, L1 expired: a Redis hit in base64 is the same directive.
    let shared2 = SharedData::default();
    let w2 = W::new(&shared2, config(upstash));
    // "Be \"terse\"." in base64.
    w2.run(1, vec![ok(r#"{"result":"QmUgInRlcnNlIi4="}"#)]);
    assert_eq!(w2.body(1), INJECTED);
    assert_eq!(w2.tier(1).as_deref(), Some("redis"));
    // An answer in Webdis's dialect is an L2 failure here: the store answers.
    let w3 = W::new(&SharedData::default(), config(upstash));
    w3.run(
        1,
        vec![
            redis_hit("Be \"terse\"."),
            store_answer(Some("Be \"terse\".")),
        ],
    );
    assert_eq!(w3.tier(1).as_deref(), Some("store"));
    assert_eq!(w3.host.counter(Counter::L2Error), 1);
}

#[test]
fn redis_hit_fills_l1_without_asking_the_store() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.run(1, vec![redis_hit("Be \"terse\".")]);
    assert_eq!(w.host.callouts.borrow().len(), 1);
    assert_eq!(w.body(1), INJECTED);
    assert_eq!(w.tier(1).as_deref(), Some("redis"));
    assert_eq!(w.host.counter(Counter::L2Hit), 1);
    let e = shared
        .get(&crate::entry::key_for(
            &crate::agent::AgentId::parse(AGENT).unwrap(),
        ))
        .unwrap();
    assert_eq!(Entry::decode(&e).unwrap().kind, Kind::Present);
}

#[test]
fn agent_without_directive_is_untouched_and_cached_negatively() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    let (flow, _) = w.answer(1, flow, redis_miss());
    let (flow, _) = w.answer(1, flow, store_answer(None));
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(w.host.req(1).resumed, 1);
    assert_eq!(w.body(1), BODY);
    on_root_tick(&w.ctx(ROOT));
    let (_, write) = w.host.last_callout();
    assert_eq!(write.method, "GET");
    assert!(write.path.ends_with(&format!(
        "/2/directive:{AGENT}/{}/10/",
        ibex_wire::flush_marker_for("directive:", &format!("directive:{AGENT}"))
    )));
    assert_eq!(w.host.counter(Counter::NoDirective), 1);

    let w2 = W::new(&shared, config(""));
    let (flow, action) = w2.headers(1);
    assert_eq!(action, Action::Continue);
    assert!(matches!(flow.state, State::Forward));
    assert!(w2.host.callouts.borrow().is_empty());
    assert!(!w2.host.req(1).headers.contains_key("content-length"));
}

#[test]
fn l1_expiry_sends_the_next_request_to_redis() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","cache":{"ttl_seconds":1}"#));
    w.run(1, vec![redis_hit("D")]);
    w.host.now.set(w.host.now.get() + 1_000);
    let (_, action) = w.headers(2);
    assert_eq!(action, Action::Pause);
    assert_eq!(w.host.counter(Counter::L1Miss), 2);
    assert_eq!(w.host.last_callout().1.cluster, "ibex_redis");
}

#[test]
fn header_problems_are_refused_or_passed() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers_with(1, head(Some("agent-7")));
    assert!(matches!(flow.state, State::Replied));
    let (status, body) = w.host.req(1).reply.clone().unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("invalid_agent_id"));

    let (flow, action) = w.headers_with(2, head(None));
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(action, Action::Continue);
    assert!(w.host.req(2).reply.is_none());

    let w = W::new(&shared, config(r#","agent":{"missing":"reject"}"#));
    w.headers_with(1, head(None));
    assert_eq!(w.reply_status(1), Some(401));
}

#[test]
fn oversized_and_encoded_bodies_are_refused_before_any_lookup() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
    let mut hd = head(Some(AGENT));
    hd.0.content_length = Some("101".into());
    w.headers_with(1, hd);
    assert_eq!(w.reply_status(1), Some(413));
    let mut hd = head(Some(AGENT));
    hd.0.content_encoding = Some("gzip".into());
    w.headers_with(2, hd);
    assert_eq!(w.reply_status(2), Some(415));
    assert!(w.host.callouts.borrow().is_empty());
}

#[test]
fn chunked_body_over_the_limit_is_refused_while_buffering() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
    w.run(1, vec![redis_hit("D")]);
    let (flow, action) = w.headers(2);
    assert_eq!(action, Action::Continue);
    let (flow, action) = w.ev(
        2,
        flow,
        Event::Body {
            size: 60,
            end_of_stream: false,
        },
    );
    assert_eq!(action, Action::Pause);
    let (flow, _) = w.ev(
        2,
        flow,
        Event::Body {
            size: 120,
            end_of_stream: false,
        },
    );
    assert!(matches!(flow.state, State::Replied));
    assert_eq!(w.reply_status(2), Some(413));
}

#[test]
fn failures_follow_failure_mode() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let flow = w.run(
        1,
        vec![
            failed(),
            Response {
                status: Some(503),
                body: vec![],
            },
        ],
    );
    assert!(matches!(flow.state, State::Replied));
    assert_eq!(w.reply_status(1), Some(503));
    assert_eq!(w.host.counter(Counter::RejectedDirectiveUnavailable), 1);
    assert_eq!(w.body(1), BODY);

    let w = W::new(&shared, config(r#","failure_mode":"open""#));
    let flow = w.run(1, vec![failed(), failed()]);
    assert!(matches!(flow.state, State::Forward));
    assert!(w.host.req(1).reply.is_none());
    assert_eq!(w.body(1), BODY);
    assert_eq!(w.tier(1).as_deref(), Some("none"));
    assert_eq!(w.host.counter(Counter::FailedOpen), 1);
}

#[test]
fn undispatchable_clusters_count_as_tier_errors() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.host
        .fail_dispatch_to
        .borrow_mut()
        .push("ibex_redis".into());
    let (_, action) = w.headers(1);
    assert_eq!(action, Action::Pause);
    assert_eq!(w.host.counter(Counter::L2Error), 1);
    assert_eq!(w.host.last_callout().1.cluster, "ibex_store");

    let w = W::new(&shared, config(""));
    w.host
        .fail_dispatch_to
        .borrow_mut()
        .extend(["ibex_redis".into(), "ibex_store".into()]);
    let (flow, action) = w.headers(1);
    assert!(matches!(flow.state, State::Replied));
    assert_eq!(action, Action::Pause);
    assert_eq!(w.reply_status(1), Some(503));
    assert_eq!(
        w.host.req(1).resumed,
        0,
        "answered from its own headers callback"
    );
}

#[test]
fn expired_entry_is_served_stale_only_while_tiers_fail_and_within_the_window() {
    let shared = SharedData::default();
    let c = r#","cache":{"ttl_seconds":1,"stale_if_error_seconds":5}"#;
    let w = W::new(&shared, config(c));
    w.run(1, vec![redis_hit("Be \"terse\".")]);
    let t0 = w.host.now.get();

    w.host.now.set(t0 + 3_000);
    w.run(2, vec![failed(), failed()]);
    assert_eq!(w.body(2), INJECTED);
    assert_eq!(w.tier(2).as_deref(), Some("stale"));
    assert_eq!(w.host.counter(Counter::StaleServed), 1);

    w.host.now.set(t0 + 7_000);
    w.run(3, vec![failed(), failed()]);
    assert_eq!(w.reply_status(3), Some(503));
}

#[test]
fn a_fill_overtaken_by_an_invalidation_writes_neither_l1_nor_l2() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    let (flow, _) = w.answer(1, flow, redis_miss());
    // An invalidation lands while the store answer is in flight.
    let r = crate::control::handle(
        Some("POST"),
        Some(&format!("/ibex/v1/invalidate/{AGENT}")),
        None,
        &w.host,
        &w.config,
    );
    assert_eq!(r.status, 204);
    w.answer(1, flow, store_answer(Some("old")));
    assert_eq!(w.host.counter(Counter::FillDiscarded), 1);
    // Write-backs leave on the root's tick: run it, then look.
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(
        w.host.counter(Counter::L2Write),
        0,
        "no write-back to Redis"
    );
    assert_eq!(
        w.host.callouts.borrow().len(),
        2,
        "L2 read and L3 read only"
    );
    assert_eq!(w.worker.borrow().write_counts(), (0, 0));
    let raw = shared
        .get(&crate::entry::key_for(
            &crate::agent::AgentId::parse(AGENT).unwrap(),
        ))
        .unwrap();
    assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
}

#[test]
fn a_fill_overtaken_by_a_flush_is_stale_at_once() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    crate::control::invalidate_all(&w.host).unwrap();
    w.answer(1, flow, redis_hit("old"));
    let (_, action) = w.headers(2);
    assert_eq!(
        action,
        Action::Pause,
        "the entry written under the old generation is not fresh"
    );
}

#[test]
fn body_delivered_while_headers_are_held_is_spliced_when_the_answer_arrives() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    let (flow, action) = w.body_end(1, flow);
    assert_eq!(action, Action::Pause);
    let (flow, _) = w.answer(1, flow, redis_hit("Be \"terse\"."));
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(w.host.req(1).resumed, 1);
    assert_eq!(w.body(1), INJECTED);
}

#[test]
fn unparseable_body_for_an_agent_with_a_directive_is_refused() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    w.host.requests.borrow_mut().get_mut(&1).unwrap().body =
        br#"{"messages":[],"messages":[]}"#.to_vec();
    let (flow, _) = w.answer(1, flow, redis_hit("D"));
    let (flow, _) = w.body_end(1, flow);
    assert!(matches!(flow.state, State::Replied));
    let (status, body) = w.host.req(1).reply.clone().unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("invalid_body"));
    assert_eq!(w.host.counter(Counter::RejectedInvalidBody), 1);
}

#[test]
fn other_paths_and_bodiless_requests_pass() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let mut hd = head(Some(AGENT));
    hd.0.path = Some("/v1/models".into());
    assert_eq!(w.headers_with(1, hd).1, Action::Continue);
    let mut hd = head(Some(AGENT));
    hd.1 = true;
    assert_eq!(w.headers_with(2, hd).1, Action::Continue);
    assert!(w.host.callouts.borrow().is_empty());
    assert_eq!(w.host.counter(Counter::PassedThrough), 2);
}

#[test]
fn write_back_outcomes_are_counted_by_the_root_after_the_request_ended() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
    w.worker.borrow_mut().forget(1);
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(w.host.counter(Counter::L2Write), 1);
    let (token, _) = w.host.last_callout();
    on_root_callout(token, failed(), &w.ctx(ROOT));
    assert_eq!(w.host.counter(Counter::L2WriteError), 1);
    assert_eq!(
        w.worker.borrow().write_counts(),
        (0, 0),
        "no token left behind"
    );

    let w = W::new(&SharedData::default(), config(""));
    w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
    on_root_tick(&w.ctx(ROOT));
    let (token, _) = w.host.last_callout();
    on_root_callout(token, ok(r#"{"EVAL":0}"#), &w.ctx(ROOT));
    assert_eq!(w.host.counter(Counter::L2WriteSkipped), 1);
    assert_eq!(w.host.counter(Counter::L2WriteError), 0);
}

#[test]
fn a_request_after_an_invalidation_does_not_join_a_fill_from_before_it() {
    for flush in [false, true] {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (f1, _) = w.headers(1);
        if flush {
            crate::control::invalidate_all(&w.host).unwrap();
        } else {
            let path = format!("/ibex/v1/invalidate/{AGENT}");
            crate::control::handle(Some("POST"), Some(&path), None, &w.host, &w.config);
        }
        let (f2, _) = w.headers(2);
        assert_eq!(w.host.counter(Counter::Coalesced), 0, "flush={flush}");
        assert_eq!(w.host.callouts.borrow().len(), 2, "a fill of its own");
        let (second, _) = w.host.last_callout();
        // The old fill answers with the old text; the new one with the new text.
        let (first, _) = w.host.callouts.borrow()[0].clone();
        let (f1, _) = w.ev(
            1,
            f1,
            Event::Callout {
                token: first,
                response: redis_hit("old"),
            },
        );
        let (f2, _) = w.ev(
            2,
            f2,
            Event::Callout {
                token: second,
                response: redis_hit("new"),
            },
        );
        let (_, _) = w.body_end(1, f1);
        let (_, _) = w.body_end(2, f2);
        assert!(w.body(1).contains(r#""content":"old""#));
        assert!(w.body(2).contains(r#""content":"new""#));
        // Only the fill that started after the invalidation was cached.
        let raw = shared
            .get(&crate::entry::key_for(
                &crate::agent::AgentId::parse(AGENT).unwrap(),
            ))
            .unwrap();
        assert_eq!(*Entry::decode(&raw).unwrap().escaped.expose(), "new");
        let (_, action) = w.headers(3);
        assert_eq!(action, Action::Continue, "served from L1");
    }
}

#[test]
fn requests_without_an_invalidation_in_between_still_join() {
    let shared = SharedData::default();
    // An expired entry exists: the fill keeps its CAS version, joiners see it too.
    let w = W::new(&shared, config(r#","cache":{"ttl_seconds":1}"#));
    w.run(1, vec![redis_hit("D")]);
    w.host.now.set(w.host.now.get() + 2_000);
    w.headers(2);
    w.headers(3);
    assert_eq!(w.host.counter(Counter::Coalesced), 1);
}

#[test]
fn concurrent_misses_for_one_agent_make_one_fill_and_all_get_its_answer() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (f1, _) = w.headers(1);
    let (f2, a2) = w.headers(2);
    let (f3, a3) = w.headers(3);
    assert_eq!((a2, a3), (Action::Pause, Action::Pause));
    assert_eq!(
        w.host.callouts.borrow().len(),
        1,
        "one L2 read for three requests"
    );
    assert_eq!(w.host.counter(Counter::Coalesced), 2);
    let (f1, _) = w.answer(1, f1, redis_miss());
    assert_eq!(w.host.callouts.borrow().len(), 2, "one L3 read");
    let (f1, _) = w.answer(1, f1, store_answer(Some("Be \"terse\".")));
    for id in [1, 2, 3] {
        assert_eq!(w.host.req(id).resumed, 1, "request {id} resumed");
        assert_eq!(w.tier(id).as_deref(), Some("store"));
    }
    for (id, flow) in [(1, f1), (2, f2), (3, f3)] {
        let (flow, action) = w.body_end(id, flow);
        assert_eq!(action, Action::Continue);
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(w.body(id), INJECTED);
    }
    assert_eq!(w.host.counter(Counter::Injected), 3);
    assert_eq!(w.host.current.get(), 3);
    assert!(w.worker.borrow().is_idle());
}

#[test]
fn coalesced_requests_share_a_failure() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (f1, _) = w.headers(1);
    let (_f2, _) = w.headers(2);
    let (f1, _) = w.answer(1, f1, failed());
    w.answer(1, f1, failed());
    assert_eq!(w.reply_status(1), Some(503));
    assert_eq!(w.reply_status(2), Some(503));
    assert_eq!(w.host.counter(Counter::RejectedDirectiveUnavailable), 2);
}

#[test]
fn a_waiter_is_not_stranded_when_the_fill_owner_goes_away() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (_f1, _) = w.headers(1);
    let (f2, _) = w.headers(2);
    // Client 1 disconnects: its context is gone, and with it the routing of the
    // callout answer (the SDK drops answers for unknown contexts).
    w.worker.borrow_mut().forget(1);
    w.host.requests.borrow_mut().remove(&1);
    assert_eq!(w.worker.borrow().fill_counts(), (1, 1));
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(w.host.callouts.borrow().len(), 2, "the root asked again");
    let (token, _) = w.host.last_callout();
    on_root_callout(token, redis_hit("Be \"terse\"."), &w.ctx(ROOT));
    assert_eq!(w.host.req(2).resumed, 1);
    let (f2, _) = w.body_end(2, f2);
    assert!(matches!(f2.state, State::Forward));
    assert_eq!(w.body(2), INJECTED);
    assert!(w.worker.borrow().is_idle());
}

#[test]
fn a_fill_nobody_waits_for_is_dropped() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.headers(1);
    w.worker.borrow_mut().forget(1);
    assert!(w.worker.borrow().is_idle());
}

#[test]
fn a_waiter_with_a_too_large_body_leaves_the_fill_for_the_others() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
    let (f1, _) = w.headers(1);
    let (f2, _) = w.headers(2);
    let (_f2, _) = w.ev(
        2,
        f2,
        Event::Body {
            size: 500,
            end_of_stream: false,
        },
    );
    assert_eq!(w.reply_status(2), Some(413));
    let (f1, _) = w.answer(1, f1, redis_hit("Be \"terse\"."));
    assert_eq!(w.host.req(2).resumed, 0, "a refused request is not resumed");
    let (f1, _) = w.body_end(1, f1);
    assert!(matches!(f1.state, State::Forward));
}

#[test]
fn redis_breaker_opens_skips_l2_then_probes() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    for i in 0..BREAKER_THRESHOLD {
        let agent = format!("00000000-0000-4000-8000-{:012}", i);
        let agent: &'static str = Box::leak(agent.into_boxed_str());
        let (f, _) = w.headers_with(10 + i, head(Some(agent)));
        let (f, _) = w.answer(10 + i, f, failed());
        let store = ok(&serde_json::json!({"agent_id": agent, "content": null}).to_string());
        w.answer(10 + i, f, store);
    }
    assert_eq!(w.host.counter(Counter::L2BreakerOpen), 1);
    let before = w.host.callouts.borrow().len();
    let (f, _) = w.headers(1);
    assert_eq!(w.host.counter(Counter::L2Skipped), 1);
    assert_eq!(
        w.host.last_callout().1.cluster,
        "ibex_store",
        "straight to L3"
    );
    assert_eq!(w.host.callouts.borrow().len(), before + 1);
    w.answer(1, f, store_answer(Some("D")));

    w.host.now.set(w.host.now.get() + BREAKER_COOL_OFF_MS);
    let (f, _) = w.headers_with(2, head(Some("00000000-0000-4000-8000-0000000000ff")));
    assert_eq!(
        w.host.last_callout().1.cluster,
        "ibex_redis",
        "one probe after the cool-off"
    );
    w.answer(2, f, redis_hit("D"));
    assert_eq!(w.host.counter(Counter::L2BreakerClose), 1);
}

#[test]
fn write_backs_are_not_sent_while_the_redis_breaker_is_open() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
    for _ in 0..BREAKER_THRESHOLD {
        w.worker
            .borrow_mut()
            .breaker(Tier::Redis)
            .failure(w.host.now.get());
    }
    let before = w.host.callouts.borrow().len();
    on_root_tick(&w.ctx(ROOT));
    assert_eq!(w.host.callouts.borrow().len(), before);
    assert_eq!(w.host.counter(Counter::L2WriteDropped), 1);
    assert_eq!(w.worker.borrow().write_counts(), (0, 0));
}

#[test]
fn store_breaker_open_fails_fast_without_a_callout() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    for _ in 0..BREAKER_THRESHOLD {
        w.worker
            .borrow_mut()
            .breaker(Tier::Store)
            .failure(w.host.now.get());
    }
    w.host
        .fail_dispatch_to
        .borrow_mut()
        .push("ibex_redis".into());
    let (flow, _) = w.headers(1);
    assert!(matches!(flow.state, State::Replied));
    assert_eq!(w.reply_status(1), Some(503));
    assert!(w.host.callouts.borrow().is_empty());
    assert_eq!(w.host.counter(Counter::L3Skipped), 1);
}

#[test]
fn the_stale_window_is_checked_again_when_the_fill_ends() {
    let shared = SharedData::default();
    let c = r#","cache":{"ttl_seconds":1,"stale_if_error_seconds":5}"#;
    let w = W::new(&shared, config(c));
    w.run(1, vec![redis_hit("Be \"terse\".")]);
    let t0 = w.host.now.get();
    // Expired, inside the stale window when the fill starts (it ends at t0 + 6 s) ...
    w.host.now.set(t0 + 3_000);
    let (flow, _) = w.headers(2);
    let (flow, _) = w.answer(2, flow, failed());
    // ... but the window has closed by the time both tiers have failed.
    w.host.now.set(t0 + 6_000);
    let (flow, _) = w.answer(2, flow, failed());
    assert!(matches!(flow.state, State::Replied));
    assert_eq!(w.reply_status(2), Some(503));
    assert_eq!(w.host.counter(Counter::StaleServed), 0);
    assert_eq!(
        w.body(2),
        BODY,
        "never forwarded with the stale text either"
    );
}

#[test]
fn a_flush_makes_every_earlier_entry_unservable_even_as_stale() {
    // SPEC §4: a flush says "everything changed", so nothing read before it is
    // served again: not fresh, and not as a stale fallback while the tiers fail.
    let shared = SharedData::default();
    let c = r#","cache":{"ttl_seconds":10,"stale_if_error_seconds":300}"#;
    let w = W::new(&shared, config(c));
    w.run(1, vec![redis_hit("old")]);
    crate::control::invalidate_all(&w.host).unwrap();

    let (flow, action) = w.headers(2);
    assert_eq!(action, Action::Pause, "a fresh pre-flush entry is a miss");
    assert_eq!(w.host.counter(Counter::L1Hit), 0);
    let (flow, _) = w.answer(2, flow, failed());
    let (flow, _) = w.answer(2, flow, failed());
    assert!(matches!(flow.state, State::Replied), "not served stale");
    assert_eq!(w.reply_status(2), Some(503));

    w.host.now.set(w.host.now.get() + 20_000);
    let (flow, _) = w.headers(3);
    let (flow, _) = w.answer(3, flow, failed());
    w.answer(3, flow, failed());
    assert_eq!(
        w.reply_status(3),
        Some(503),
        "expired pre-flush entry: not stale"
    );
    assert_eq!(w.host.counter(Counter::StaleServed), 0);
}

#[test]
fn trailers_after_a_buffered_body_are_refused_never_released_unspliced() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.run(1, vec![redis_hit("Be \"terse\".")]);
    // L1 hit: headers go on at once, the body is buffered ...
    let (flow, action) = w.headers(2);
    assert_eq!(action, Action::Continue);
    let size = w.host.req(2).body.len();
    let (flow, action) = w.ev(
        2,
        flow,
        Event::Body {
            size,
            end_of_stream: false,
        },
    );
    assert_eq!(action, Action::Pause);
    // ... and ends in trailers (HTTP/2 HEADERS after the last DATA frame).
    let (flow, action) = w.ev(2, flow, Event::Trailers);
    assert_eq!(action, Action::Pause);
    assert!(matches!(flow.state, State::Replied));
    let (status, reply) = w.host.req(2).reply.clone().unwrap();
    assert_eq!(status, 400);
    assert!(reply.contains("invalid_body"));
    assert!(!reply.contains("terse"), "no directive text in a reply");
    assert_eq!(
        w.body(2),
        BODY,
        "the buffer was not spliced: it must not go"
    );
    assert_eq!(w.host.counter(Counter::RejectedInvalidBody), 1);
    assert_eq!(w.host.counter(Counter::Injected), 1, "only request 1");
}

#[test]
fn trailers_while_waiting_for_a_fill_are_refused_and_leave_the_fill() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (f1, _) = w.headers(1);
    let (f2, _) = w.headers(2);
    let (f2, _) = w.ev(2, f2, Event::Trailers);
    assert!(matches!(f2.state, State::Replied));
    assert_eq!(w.reply_status(2), Some(400));
    let (f1, _) = w.answer(1, f1, redis_hit("Be \"terse\"."));
    assert_eq!(w.host.req(2).resumed, 0, "a refused request is not resumed");
    let (f1, _) = w.body_end(1, f1);
    assert!(matches!(f1.state, State::Forward));
    assert_eq!(w.body(1), INJECTED);
    assert!(w.worker.borrow().is_idle());
}

#[test]
fn trailers_of_requests_that_carry_no_directive_pass() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    // An agent without a directive.
    let (flow, _) = w.headers(1);
    let (flow, _) = w.answer(1, flow, redis_hit(""));
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(w.ev(1, flow, Event::Trailers).1, Action::Continue);
    // No agent, in pass mode.
    let (flow, _) = w.headers_with(2, head(None));
    assert_eq!(w.ev(2, flow, Event::Trailers).1, Action::Continue);
    assert_eq!(w.host.counter(Counter::RejectedInvalidBody), 0);
}

#[test]
fn a_partly_delivered_body_is_not_released_before_it_is_spliced() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    let (flow, _) = w.headers(1);
    // The host delivers part of the body while headers are held ...
    let (flow, action) = w.ev(
        1,
        flow,
        Event::Body {
            size: 10,
            end_of_stream: false,
        },
    );
    assert_eq!(action, Action::Pause);
    // ... then the answer comes: resuming now would let those 10 bytes go unspliced.
    let (flow, _) = w.answer(1, flow, redis_hit("Be \"terse\"."));
    assert_eq!(w.host.req(1).resumed, 0, "held until the body is complete");
    let (flow, action) = w.body_end(1, flow);
    assert_eq!(action, Action::Continue, "headers and body go on together");
    assert!(matches!(flow.state, State::Forward));
    assert_eq!(w.body(1), INJECTED);
}

mod jwt_source {
    //! `agent.source = "jwt"`: the agent is the verified claim jwt_authn left in the
    //! dynamic metadata; the client's agent header is never consulted nor forwarded.

    use super::*;

    const OTHER: &str = "00000000-0000-4000-8000-000000000001";
    const PAYLOAD: &str = "metadata.filter_metadata.envoy.filters.http.jwt_authn.idp";

    fn jwt_config(claim: &str) -> Config {
        config(&format!(
            r#","agent":{{"source":"jwt","jwt":{{"provider":"idp","claim":"{claim}"}}}}"#
        ))
    }

    /// Request `id` with a body, the client's agent header `header` (both in the host's
    /// request and in what admission sees), and the verified claim at `claim_path`.
    fn start(
        w: &W,
        id: u32,
        header: &str,
        claim: Option<(&str, &[u8])>,
        eos: bool,
    ) -> (Flow, Action) {
        if let Some((path, value)) = claim {
            w.host
                .properties
                .borrow_mut()
                .insert(format!("{PAYLOAD}.{path}"), value.to_vec());
        }
        w.host.add_request(id, BODY.as_bytes());
        w.host
            .requests
            .borrow_mut()
            .get_mut(&id)
            .unwrap()
            .headers
            .insert("x-agent-id".into(), header.into());
        let (head, _) = head(Some(header));
        let event = Event::Headers {
            head: &head,
            end_of_stream: eos,
        };
        w.ev(id, Flow::new(), event)
    }

    fn header_gone(w: &W, id: u32) -> bool {
        !w.host.req(id).headers.contains_key("x-agent-id")
    }

    #[test]
    fn the_verified_claim_names_the_agent_not_the_header() {
        let w = W::new(&SharedData::default(), jwt_config("agent_id"));
        let (flow, action) = start(&w, 1, OTHER, Some(("agent_id", AGENT.as_bytes())), false);
        assert_eq!(action, Action::Pause);
        let (_, l2) = w.host.last_callout();
        assert!(l2.path.contains(AGENT), "{}", l2.path);
        assert!(!l2.path.contains(OTHER));
        let (flow, _) = w.answer(1, flow, redis_miss());
        let (flow, _) = w.answer(1, flow, store_answer(Some("Be \"terse\".")));
        let (flow, _) = w.body_end(1, flow);
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(w.body(1), INJECTED);
        assert!(header_gone(&w, 1));
        assert_eq!(
            *w.host.properties_read.borrow(),
            [format!("{PAYLOAD}.agent_id")],
            "read once"
        );
    }

    #[test]
    fn a_dotted_claim_path_is_followed() {
        let w = W::new(&SharedData::default(), jwt_config("ibex.agent"));
        let (_, action) = start(&w, 1, OTHER, Some(("ibex.agent", AGENT.as_bytes())), false);
        assert_eq!(action, Action::Pause);
        assert!(w.host.last_callout().1.path.contains(AGENT));
        assert_eq!(
            *w.host.properties_read.borrow(),
            [format!("{PAYLOAD}.ibex.agent")]
        );
        assert!(header_gone(&w, 1));
    }

    #[test]
    fn no_verified_payload_is_401_and_the_header_is_not_used() {
        for missing in ["pass", "reject"] {
            let c = config(&format!(
                r#","agent":{{"source":"jwt","missing":"{missing}","jwt":{{"provider":"idp"}}}}"#
            ));
            let w = W::new(&SharedData::default(), c);
            let (flow, _) = start(&w, 1, AGENT, None, false);
            assert!(matches!(flow.state, State::Replied));
            assert_eq!(w.reply_status(1), Some(401));
            assert!(w
                .host
                .req(1)
                .reply
                .as_ref()
                .unwrap()
                .1
                .contains("missing_agent_id"));
            assert!(w.host.callouts.borrow().is_empty());
            assert!(header_gone(&w, 1));
        }
        // A payload without that claim is the same.
        let w = W::new(&SharedData::default(), jwt_config("agent_id"));
        start(&w, 1, AGENT, Some(("sub", AGENT.as_bytes())), true);
        assert_eq!(w.reply_status(1), Some(401));
    }

    #[test]
    fn a_claim_that_is_no_uuid_is_400() {
        let w = W::new(&SharedData::default(), jwt_config("agent_id"));
        start(&w, 1, AGENT, Some(("agent_id", b"agent-7")), false);
        assert_eq!(w.reply_status(1), Some(400));
        assert!(w
            .host
            .req(1)
            .reply
            .as_ref()
            .unwrap()
            .1
            .contains("invalid_agent_id"));
        assert!(w.host.callouts.borrow().is_empty());
        assert!(header_gone(&w, 1));
    }

    #[test]
    fn the_client_header_is_removed_on_pass_through_too() {
        let w = W::new(&SharedData::default(), jwt_config("agent_id"));
        // Bodiless: forwarded untouched, but without the client's agent header.
        let (flow, action) = start(&w, 1, OTHER, Some(("agent_id", AGENT.as_bytes())), true);
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(action, Action::Continue);
        assert!(header_gone(&w, 1));
    }

    #[test]
    fn the_header_source_reads_no_property_and_keeps_the_header() {
        let w = W::new(&SharedData::default(), config(""));
        start(&w, 1, AGENT, None, true);
        assert!(w.host.properties_read.borrow().is_empty());
        assert!(!header_gone(&w, 1));
    }
}

/// `agent.source = "api_key"`: the key's agent through the tiers, then its directive.
mod api_key {
    use super::*;
    use crate::apikey::KeyHash;

    const KEY: &str = "ibex_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

    fn key_config(extra: &str) -> Config {
        config(&format!(r#","agent":{{"source":"api_key"}}{extra}"#))
    }

    fn hex() -> String {
        KeyHash::of(KEY.as_bytes()).hex()
    }

    fn key_head(authorization: Option<&str>) -> (HeadFields, bool) {
        let (mut fields, eos) = head(None);
        fields.api_key = authorization.map(|a| ibex_wire::Redacted::new(a.to_string()));
        (fields, eos)
    }

    fn bearer() -> String {
        format!("Bearer {KEY}")
    }

    /// A key's Redis answer: its value and the 60 s Redis gives it.
    fn key_hit(value: &str) -> Response {
        key_hit_ttl(value, 60_000)
    }

    fn key_hit_ttl(value: &str, pttl_ms: u64) -> Response {
        ok(&format!(
            "*2\r\n${}\r\n{}\r\n:{pttl_ms}\r\n",
            value.len(),
            value
        ))
    }

    fn store_key(agent: Option<&str>) -> Response {
        ok(&serde_json::json!({"key_sha256": hex(), "agent_id": agent}).to_string())
    }

    /// Headers of request `id` with the key, the client's own agent header and the
    /// key header set as the client sent them.
    fn start(w: &W, id: u32, key: Option<&str>) -> (Flow, Action) {
        w.host.add_request(id, BODY.as_bytes());
        {
            let mut requests = w.host.requests.borrow_mut();
            let req = requests.get_mut(&id).unwrap();
            req.headers.insert("x-agent-id".into(), AGENT.into());
            req.headers.insert("authorization".into(), bearer());
        }
        let (head, eos) = key_head(key);
        let event = Event::Headers {
            head: &head,
            end_of_stream: eos,
        };
        w.ev(id, Flow::new(), event)
    }

    /// Two keys of one agent: the second key's answer, for two coalesced requests,
    /// moves both onto the directive fill the first key's request started. Joining it
    /// for the request that is not the current context must not borrow the worker
    /// twice (that was a panic, taking the worker's VM down).
    #[test]
    fn requests_of_a_second_key_join_the_agents_directive_fill_in_flight() {
        let w = W::new(&SharedData::default(), key_config(""));
        let (f1, _) = start(&w, 1, Some(&bearer()));
        let (f1, _) = w.answer(1, f1, key_hit(AGENT));
        let (f1, _) = w.answer(1, f1, key_hit(AGENT));
        assert!(f1.is_waiting(), "the directive fill is in flight");
        assert_eq!(
            w.host.last_callout().1.path,
            format!("/GET/directive:{AGENT}.raw")
        );
        let directive_token = w.host.last_callout().0;
        let other = "Bearer ibex_second_key_of_the_same_agent_0123456789abcdef";
        let (f2, _) = start(&w, 2, Some(other));
        let (f3, _) = start(&w, 3, Some(other));
        assert_eq!(
            w.host.counter(Counter::Coalesced),
            1,
            "3 joined 2's key fill"
        );
        let (f2, _) = w.answer(2, f2, key_hit(AGENT));
        let (f2, _) = w.answer(2, f2, key_hit(AGENT));
        assert!(f2.is_waiting());
        assert_eq!(
            w.host.counter(Counter::Coalesced),
            3,
            "2 and 3 joined 1's directive fill"
        );
        // The directive's answer arrives in context 1 and serves all three.
        let (f1, _) = w.ev(
            1,
            f1,
            Event::Callout {
                token: directive_token,
                response: redis_hit("Be \"terse\"."),
            },
        );
        for (id, flow) in [(1, f1), (2, f2), (3, f3)] {
            let flow = w
                .ev(
                    id,
                    flow,
                    Event::Body {
                        size: 0,
                        end_of_stream: false,
                    },
                )
                .0;
            let _ = w.body_end(id, flow);
            assert_eq!(w.body(id), INJECTED, "request {id}");
        }
    }

    #[test]
    fn a_cold_key_then_its_directive_through_every_tier_then_both_warm_cost_no_callout() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let (f, a) = start(&w, 1, Some(&bearer()));
        assert_eq!(a, Action::Pause);
        for name in ["authorization", "x-agent-id"] {
            assert!(!w.host.req(1).headers.contains_key(name), "{name} removed");
        }
        let (_, call) = w.host.last_callout();
        assert!(
            call.path.starts_with("/EVAL/")
                && call.path.ends_with(&format!("/1/agent_key:{}.raw", hex()))
        );
        let (f, _) = w.answer(1, f, redis_miss());
        let (_, call) = w.host.last_callout();
        assert_eq!(call.path, format!("/v1/keys/{}", hex()));
        let (f, _) = w.answer(1, f, store_key(Some(AGENT)));
        // A first look caches nothing: the key's agent is asked again, anchored.
        let key_entry = crate::entry::key_for_api_key(&KeyHash::of(KEY.as_bytes()));
        let (_, call) = w.host.last_callout();
        assert_eq!(
            call.path,
            format!("/v1/keys/{}", hex()),
            "the tier that answered"
        );
        assert!(
            shared.get(&key_entry).is_some(),
            "anchored for the second look"
        );
        let (f, _) = w.answer(1, f, store_key(Some(AGENT)));
        let written = shared.get(&key_entry).unwrap();
        assert_eq!(Entry::decode(&written).unwrap().kind, Kind::Agent);
        // The key is known: the directive's fill starts from the same context.
        let (_, call) = w.host.last_callout();
        assert_eq!(call.path, format!("/GET/directive:{AGENT}.raw"));
        assert_eq!(w.host.dispatched_in.borrow().last(), Some(&1));
        assert!(f.is_waiting());
        let (f, _) = w.answer(1, f, redis_miss());
        let (f, _) = w.answer(1, f, store_answer(Some("Be \"terse\".")));
        assert_eq!(w.host.req(1).resumed, 1);
        let (f, a) = w.body_end(1, f);
        assert_eq!(a, Action::Continue);
        assert!(matches!(f.state, State::Forward));
        assert_eq!(w.body(1), INJECTED);
        on_root_tick(&w.ctx(ROOT));
        let writes: Vec<String> = w
            .host
            .callouts
            .borrow()
            .iter()
            .map(|(_, c)| c.path.clone())
            .filter(|p| p.starts_with("/EVAL/") && p.contains("__flush__"))
            .collect();
        assert_eq!(writes.len(), 2, "both answers written back: {writes:?}");
        assert!(writes[0].ends_with(&format!(
            "/2/agent_key:{}/{}/60",
            hex(),
            ibex_wire::flush_marker_for("agent_key:", &format!("agent_key:{}", hex()))
        )));
        for c in [
            Counter::KeyL1Miss,
            Counter::KeyL2Miss,
            Counter::KeyL3Hit,
            Counter::L1Miss,
            Counter::L2Miss,
            Counter::L3Hit,
            Counter::Injected,
        ] {
            assert_eq!(w.host.counter(c), 1, "{c:?}");
        }
        assert!(w.worker.borrow().is_idle());

        // Another worker: both entries warm, no callout at all.
        let w2 = W::new(&shared, key_config(""));
        let (f, a) = start(&w2, 1, Some(&bearer()));
        assert_eq!(a, Action::Continue);
        let (f, _) = w2.body_end(1, f);
        assert!(matches!(f.state, State::Forward));
        assert_eq!(w2.body(1), INJECTED);
        assert!(w2.host.callouts.borrow().is_empty());
        assert_eq!(w2.host.counter(Counter::KeyL1Hit), 1);
        assert_eq!(w2.host.counter(Counter::L1Hit), 1);
    }

    #[test]
    fn no_key_or_a_malformed_one_is_refused_before_any_lookup() {
        let w = W::new(&SharedData::default(), key_config(""));
        start(&w, 1, None);
        assert_eq!(w.reply_status(1), Some(401));
        assert!(w
            .host
            .req(1)
            .reply
            .as_ref()
            .unwrap()
            .1
            .contains("missing_agent_id"));
        assert!(w
            .host
            .req(1)
            .reply
            .as_ref()
            .unwrap()
            .1
            .contains("authorization"));
        start(&w, 2, Some(&format!("Basic {KEY}")));
        assert_eq!(w.reply_status(2), Some(401));
        assert!(w
            .host
            .req(2)
            .reply
            .as_ref()
            .unwrap()
            .1
            .contains("invalid_api_key"));
        assert!(w.host.callouts.borrow().is_empty());
        assert!(!w.host.req(2).headers.contains_key("authorization"));
        // The client's agent header names an agent: irrelevant with this source.
        assert_eq!(w.host.counter(Counter::RejectedInvalidApiKey), 1);
        assert_eq!(w.host.counter(Counter::RejectedMissingAgentId), 1);
    }

    #[test]
    fn an_unknown_key_is_refused_and_remembered_for_the_negative_ttl() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, redis_miss());
        let (f, _) = w.answer(1, f, store_key(None));
        assert!(matches!(f.state, State::Replied));
        let reply = w.host.req(1).reply.clone().unwrap();
        assert_eq!(reply.0, 401);
        assert!(reply.1.contains("invalid_api_key"));
        assert!(!reply.1.contains(KEY) && !reply.1.contains(&hex()));
        assert_eq!(w.host.counter(Counter::KeyL3None), 1);
        assert_eq!(w.host.callouts.borrow().len(), 2);
        start(&w, 2, Some(&bearer()));
        assert_eq!(w.reply_status(2), Some(401));
        assert_eq!(w.host.callouts.borrow().len(), 2, "answered from L1");
        w.host.now.set(w.host.now.get() + 10_000);
        start(&w, 3, Some(&bearer()));
        assert_eq!(w.host.callouts.borrow().len(), 3, "negative TTL over");
    }

    #[test]
    fn concurrent_requests_with_one_key_make_one_key_fill_and_one_directive_fill() {
        let w = W::new(&SharedData::default(), key_config(""));
        let (f1, _) = start(&w, 1, Some(&bearer()));
        let (f2, _) = start(&w, 2, Some(&bearer()));
        // Request 2's body arrives while it waits (a host that delivers it).
        let size = w.host.req(2).body.len();
        let (f2, _) = w.ev(
            2,
            f2,
            Event::Body {
                size,
                end_of_stream: true,
            },
        );
        assert_eq!(w.host.callouts.borrow().len(), 1);
        assert_eq!(w.host.counter(Counter::Coalesced), 1);
        let (f1, _) = w.answer(1, f1, key_hit(AGENT));
        assert_eq!(
            w.host.callouts.borrow().len(),
            2,
            "the anchored second look"
        );
        let (f1, _) = w.answer(1, f1, key_hit(AGENT));
        assert_eq!(
            w.host.counter(Counter::KeyL2Hit),
            1,
            "counted once per fill"
        );
        assert_eq!(w.host.callouts.borrow().len(), 3, "one directive read");
        assert_eq!(w.host.dispatched_in.borrow().last(), Some(&1));
        assert_eq!(w.host.current.get(), 1, "back in the running context");
        let (f1, _) = w.answer(1, f1, redis_hit("Be \"terse\"."));
        let (f1, _) = w.body_end(1, f1);
        assert!(matches!(f1.state, State::Forward));
        // Request 2 had its whole body: spliced when the directive arrived.
        assert_eq!(w.body(2), INJECTED);
        assert_eq!(w.host.req(2).resumed, 1);
        let (f2, _) = w.ev(
            2,
            f2,
            Event::Body {
                size: INJECTED.len(),
                end_of_stream: true,
            },
        );
        assert!(matches!(f2.state, State::Forward));
        assert_eq!(w.body(1), INJECTED);
        assert_eq!(w.host.counter(Counter::Injected), 2);
        assert!(w.worker.borrow().is_idle());
    }

    #[test]
    fn a_revocation_during_the_first_look_is_seen_by_the_second() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let key_entry = crate::entry::key_for_api_key(&KeyHash::of(KEY.as_bytes()));
        let (f, _) = start(&w, 1, Some(&bearer()));
        assert!(
            shared.get(&key_entry).is_none(),
            "a first look writes nothing"
        );
        let (f, _) = w.answer(1, f, redis_miss());
        let (store_read, _) = w.host.last_callout();
        // revoke-key lands now: the subscriber tombstones Redis, then the control
        // role tombstones the key's L1 entry.
        crate::control::invalidate_key(&KeyHash::of(KEY.as_bytes()), &w.host).unwrap();
        // A request arriving after it does not join the fill from before it.
        let (_f2, _) = start(&w, 2, Some(&bearer()));
        assert_eq!(w.host.counter(Counter::Coalesced), 0);
        assert_eq!(w.host.callouts.borrow().len(), 3, "request 2 asks anew");
        // The first look's answer was read before the revocation: it is asked again.
        let event = Event::Callout {
            token: store_read,
            response: store_key(Some(AGENT)),
        };
        let (f, _) = w.ev(1, f, event);
        assert!(f.is_waiting());
        let (_, call) = w.host.last_callout();
        assert_eq!(call.path, format!("/v1/keys/{}", hex()));
        let (f, _) = w.answer(1, f, store_key(None));
        assert!(matches!(f.state, State::Replied));
        assert_eq!(w.reply_status(1), Some(401));
        let raw = shared.get(&key_entry).unwrap();
        assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
    }

    #[test]
    fn a_revocation_during_the_second_look_wins() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let key_entry = crate::entry::key_for_api_key(&KeyHash::of(KEY.as_bytes()));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        // Anchored; the revocation lands while the second look is in flight.
        crate::control::invalidate_key(&KeyHash::of(KEY.as_bytes()), &w.host).unwrap();
        let (_f, _) = w.answer(1, f, key_hit(AGENT));
        assert_eq!(w.host.counter(Counter::FillDiscarded), 1);
        let raw = shared.get(&key_entry).unwrap();
        assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
        on_root_tick(&w.ctx(ROOT));
        assert!(
            !w.host
                .callouts
                .borrow()
                .iter()
                .any(|(_, c)| c.path.contains("agent_key:__flush__")),
            "no key write-back"
        );
    }

    #[test]
    fn unknown_keys_leave_nothing_in_shared_data_and_are_remembered_per_worker() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        for (id, n) in (10..60).zip(0u32..) {
            let made_up = format!("Bearer ibex_made_up_{n}");
            let (f, _) = start(&w, id, Some(&made_up));
            let (f, _) = w.answer(id, f, redis_miss());
            let hash = KeyHash::of(format!("ibex_made_up_{n}").as_bytes()).hex();
            let answer = ok(&serde_json::json!({"key_sha256": hash, "agent_id": null}).to_string());
            w.answer(id, f, answer);
            assert_eq!(w.reply_status(id), Some(401));
        }
        let keys = shared.keys();
        assert!(
            keys.iter()
                .all(|k| !k.starts_with(crate::entry::KEY_ENTRY_PREFIX)),
            "{keys:?}"
        );
        // Remembered by the worker: the same key again costs no callout.
        let before = w.host.callouts.borrow().len();
        start(&w, 70, Some("Bearer ibex_made_up_0"));
        assert_eq!(w.reply_status(70), Some(401));
        assert_eq!(w.host.callouts.borrow().len(), before);
        assert_eq!(w.worker.borrow().unknown_key_count(), 50);
        // And written back to Redis for the other workers (negative TTL).
        on_root_tick(&w.ctx(ROOT));
        let negative_writes = w
            .host
            .callouts
            .borrow()
            .iter()
            .filter(|(_, c)| {
                c.path.starts_with("/EVAL/")
                    && c.path.contains("/agent_key:__flush__{")
                    && c.path.ends_with("}/10/")
            })
            .count();
        assert_eq!(negative_writes, 50);
        // A flush forgets them.
        crate::control::invalidate_all(&w.host).unwrap();
        start(&w, 71, Some("Bearer ibex_made_up_0"));
        assert_eq!(w.host.callouts.borrow().len(), before + 51);
    }

    #[test]
    fn the_unknown_key_memory_is_bounded() {
        let mut worker = Worker::default();
        for n in 0..(crate::worker::MAX_UNKNOWN_KEYS as u32 * 2) {
            worker.remember_unknown_key(KeyHash::of(&n.to_le_bytes()), 1_000 + u64::from(n), 0, 0);
        }
        assert!(worker.unknown_key_count() <= crate::worker::MAX_UNKNOWN_KEYS);
    }

    #[test]
    fn a_large_body_on_a_pass_path_waits_for_its_key_like_any_other() {
        let w = W::new(
            &SharedData::default(),
            key_config(r#","inject":{"max_body_bytes":10}"#),
        );
        w.host.add_request(1, BODY.as_bytes());
        let (mut fields, _) = key_head(Some(&bearer()));
        fields.path = Some("/v1/embeddings".into());
        let event = Event::Headers {
            head: &fields,
            end_of_stream: false,
        };
        let (f, _) = w.ev(1, Flow::new(), event);
        let event = Event::Body {
            size: BODY.len(),
            end_of_stream: true,
        };
        let (f, a) = w.ev(1, f, event);
        assert_eq!((w.reply_status(1), a), (None, Action::Pause));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        assert!(matches!(f.state, State::Forward));
        assert_eq!(w.host.req(1).resumed, 1);
        assert_eq!(w.body(1), BODY, "forwarded untouched");
        // A chat body over the limit is still refused while its key is looked up.
        w.host.add_request(2, BODY.as_bytes());
        let (fields, _) = key_head(Some("Bearer ibex_other"));
        let event = Event::Headers {
            head: &fields,
            end_of_stream: false,
        };
        let (f, _) = w.ev(2, Flow::new(), event);
        let event = Event::Body {
            size: BODY.len(),
            end_of_stream: true,
        };
        w.ev(2, f, event);
        assert_eq!(w.reply_status(2), Some(413));
    }

    #[test]
    fn an_expired_key_entry_is_refreshed_with_one_look() {
        let w = W::new(&SharedData::default(), key_config(""));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        w.answer(1, f, redis_hit("Be \"terse\"."));
        w.host.now.set(w.host.now.get() + 61_000);
        let before = w.host.callouts.borrow().len();
        let (f, _) = start(&w, 2, Some(&bearer()));
        let (f, _) = w.answer(2, f, key_hit(AGENT));
        // Anchored on the expired entry: no second look, straight to the directive.
        assert_eq!(w.host.callouts.borrow().len(), before + 2);
        assert_eq!(
            w.host.last_callout().1.path,
            format!("/GET/directive:{AGENT}.raw")
        );
        assert!(f.is_waiting());
        assert_eq!(
            w.host.counter(Counter::KeyL2Hit),
            2,
            "each fill counted once"
        );
    }

    #[test]
    fn a_key_is_cached_no_longer_than_redis_keeps_it() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, key_hit_ttl(AGENT, 5_000));
        w.answer(1, f, key_hit_ttl(AGENT, 4_000));
        let raw = shared
            .get(&crate::entry::key_for_api_key(&KeyHash::of(KEY.as_bytes())))
            .unwrap();
        let e = Entry::decode(&raw).unwrap();
        assert_eq!(e.fresh_until_ms, w.host.now.get() + 4_000);
        // An unknown key likewise, in the worker's memory.
        let (f, _) = start(&w, 2, Some("Bearer ibex_gone"));
        w.answer(2, f, key_hit_ttl("", 1_500));
        assert_eq!(w.reply_status(2), Some(401));
        let gone = KeyHash::of(b"ibex_gone");
        let now = w.host.now.get();
        assert!(w.worker.borrow().is_unknown_key(&gone, now + 1_499, 0));
        assert!(!w.worker.borrow().is_unknown_key(&gone, now + 1_500, 0));
    }

    #[test]
    fn a_key_is_never_served_stale() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        let (_f, _) = w.answer(1, f, key_hit(AGENT));
        // Expired, inside the stale window; Redis and the store both fail.
        w.host.now.set(w.host.now.get() + 61_000);
        let (f, _) = start(&w, 2, Some(&bearer()));
        let (f, _) = w.answer(2, f, failed());
        w.answer(2, f, failed());
        assert_eq!(w.reply_status(2), Some(503));
        assert_eq!(w.host.counter(Counter::StaleServed), 0);
    }

    #[test]
    fn an_unknowable_key_is_refused_even_when_failure_mode_is_open() {
        let w = W::new(
            &SharedData::default(),
            key_config(r#","failure_mode":"open""#),
        );
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, failed());
        let (f, _) = w.answer(1, f, failed());
        assert!(matches!(f.state, State::Replied));
        assert_eq!(w.reply_status(1), Some(503));
        assert_eq!(w.host.counter(Counter::FailedOpen), 0);
    }

    #[test]
    fn a_hostile_redis_value_for_a_key_is_an_error_and_the_store_decides() {
        for value in [
            "6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC",
            "6f1c1a3e5b7d4c2a9e0f123456789abc",
            "Be terse.",
        ] {
            let w = W::new(&SharedData::default(), key_config(""));
            let (f, _) = start(&w, 1, Some(&bearer()));
            let (_f, _) = w.answer(1, f, key_hit(value));
            assert_eq!(w.host.counter(Counter::L2Error), 1, "{value}");
            assert_eq!(w.host.last_callout().1.path, format!("/v1/keys/{}", hex()));
        }
    }

    #[test]
    fn what_the_headers_decided_applies_once_the_key_is_good() {
        let shared = SharedData::default();
        let w = W::new(&shared, key_config(""));
        // A bodiless request with a good key, cold: the key is checked, then it passes.
        w.host.add_request(1, b"");
        let (mut fields, _) = key_head(Some(&bearer()));
        fields.path = Some("/v1/models".into());
        let (f, a) = w.ev(
            1,
            Flow::new(),
            Event::Headers {
                head: &fields,
                end_of_stream: true,
            },
        );
        assert_eq!(a, Action::Pause);
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        let (f, _) = w.answer(1, f, key_hit(AGENT));
        assert!(matches!(f.state, State::Forward));
        assert_eq!(w.host.req(1).resumed, 1);
        assert_eq!(w.host.counter(Counter::PassedThrough), 1);
        assert_eq!(w.host.callouts.borrow().len(), 2, "no directive lookup");
        // A compressed body with the (now warm) good key: 415, no callout.
        let (mut fields, _) = key_head(Some(&bearer()));
        fields.content_encoding = Some("gzip".into());
        w.host.add_request(2, BODY.as_bytes());
        w.ev(
            2,
            Flow::new(),
            Event::Headers {
                head: &fields,
                end_of_stream: false,
            },
        );
        assert_eq!(w.reply_status(2), Some(415));
        // The same with an unknown key: the key is answered first.
        let other = "Bearer ibex_unknown";
        let (mut fields, _) = key_head(Some(other));
        fields.content_encoding = Some("gzip".into());
        w.host.add_request(3, BODY.as_bytes());
        let (f, _) = w.ev(
            3,
            Flow::new(),
            Event::Headers {
                head: &fields,
                end_of_stream: false,
            },
        );
        let (f, _) = w.answer(3, f, redis_miss());
        let hash = KeyHash::of(b"ibex_unknown").hex();
        let answer = ok(&serde_json::json!({"key_sha256": hash, "agent_id": null}).to_string());
        w.answer(3, f, answer);
        assert_eq!(w.reply_status(3), Some(401));
    }

    #[test]
    fn a_store_answer_for_another_key_is_an_error() {
        let w = W::new(&SharedData::default(), key_config(""));
        let (f, _) = start(&w, 1, Some(&bearer()));
        let (f, _) = w.answer(1, f, redis_miss());
        let other = KeyHash::of(b"other").hex();
        let answer = ok(&serde_json::json!({"key_sha256": other, "agent_id": AGENT}).to_string());
        w.answer(1, f, answer);
        assert_eq!(w.host.counter(Counter::L3Error), 1);
        assert_eq!(w.reply_status(1), Some(503));
    }
}

mod audit_trail {
    //! One audit record per request, written when its outcome is decided, naming the
    //! agent, the version it was served, the tier and the outcome; and the lookups a
    //! traced request causes carry its `traceparent`.
    use super::*;
    use crate::audit::Fields;

    const VERSION: &str = "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d";

    fn versioned_store_answer(content: &str) -> Response {
        ok(
            &serde_json::json!({"agent_id": AGENT, "content": content, "version_id": VERSION})
                .to_string(),
        )
    }

    fn only_record(w: &W, id: u32) -> Fields {
        let audits = w.host.req(id).audits.clone();
        assert_eq!(audits.len(), 1, "one record per request: {audits:?}");
        audits[0].clone()
    }

    fn fields(f: &Fields) -> (&str, &str, &str, &str) {
        (&f.agent_id, &f.directive_version, f.tier, &f.outcome)
    }

    #[test]
    fn the_version_travels_from_the_store_through_l1_and_redis() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.run(
            1,
            vec![redis_miss(), versioned_store_answer("Be \"terse\".")],
        );
        assert_eq!(w.body(1), INJECTED);
        assert_eq!(
            fields(&only_record(&w, 1)),
            (AGENT, VERSION, "store", "injected")
        );
        // The write-back carries the version in the Redis value.
        on_root_tick(&w.ctx(ROOT));
        let write = w.host.last_callout().1;
        let value = write.body.as_ref().unwrap().expose().clone();
        assert_eq!(
            value,
            ibex_wire::versioned_directive_value(VERSION, "Be \"terse\".").into_bytes()
        );
        // Another worker: L1 hit, same version.
        let w2 = W::new(&shared, config(""));
        w2.run(1, vec![]);
        assert_eq!(
            fields(&only_record(&w2, 1)),
            (AGENT, VERSION, "local", "injected")
        );
        // A cold worker of another Envoy: Redis answers with the versioned value.
        let w3 = W::new(&SharedData::default(), config(""));
        let text = String::from_utf8(value).unwrap();
        w3.run(1, vec![redis_hit(&text)]);
        assert_eq!(w3.body(1), INJECTED);
        assert_eq!(
            fields(&only_record(&w3, 1)),
            (AGENT, VERSION, "redis", "injected")
        );
        // A value written by an older filter (no version) reads as unknown.
        let w4 = W::new(&SharedData::default(), config(""));
        w4.run(1, vec![redis_hit("Be \"terse\".")]);
        assert_eq!(
            fields(&only_record(&w4, 1)),
            (AGENT, "unknown", "redis", "injected")
        );
    }

    #[test]
    fn every_outcome_is_recorded_once() {
        let w = W::new(&SharedData::default(), config(""));
        w.run(1, vec![redis_miss(), store_answer(None)]);
        assert_eq!(
            fields(&only_record(&w, 1)),
            (AGENT, "none", "store", "no_directive")
        );

        let w = W::new(&SharedData::default(), config(""));
        w.run(1, vec![failed(), failed()]);
        assert_eq!(
            fields(&only_record(&w, 1)),
            (AGENT, "none", "none", "refused:directive_unavailable"),
            "no tier answered"
        );

        let w = W::new(&SharedData::default(), config(r#","failure_mode":"open""#));
        w.run(1, vec![failed(), failed()]);
        assert_eq!(
            fields(&only_record(&w, 1)),
            (AGENT, "none", "none", "failed_open")
        );

        let w = W::new(&SharedData::default(), config(""));
        let (_, _) = w.headers_with(1, head(Some("not-a-uuid")));
        assert_eq!(
            fields(&only_record(&w, 1)),
            ("-", "none", "none", "refused:invalid_agent_id")
        );

        let w = W::new(&SharedData::default(), config(""));
        let (_, _) = w.headers_with(1, head(None));
        assert_eq!(fields(&only_record(&w, 1)), ("-", "none", "none", "passed"));

        // A body that cannot take the directive: refused after the lookup.
        let w = W::new(&SharedData::default(), config(""));
        w.host.add_request(2, b"{\"messages\":1}");
        let (flow, _) = w.headers(2);
        let (flow, _) = w.answer(2, flow, redis_hit("D"));
        let _ = w.body_end(2, flow);
        assert_eq!(
            fields(&only_record(&w, 2)),
            (AGENT, "none", "redis", "refused:invalid_body")
        );
    }

    #[test]
    fn coalesced_requests_each_get_their_own_record() {
        let w = W::new(&SharedData::default(), config(""));
        w.host.add_request(2, BODY.as_bytes());
        let (f1, _) = w.headers(1);
        let (f2, _) = w.headers(2);
        let (f1, _) = w.answer(1, f1, redis_miss());
        let (f1, _) = w.answer(1, f1, versioned_store_answer("Be \"terse\"."));
        let _ = w.body_end(1, f1);
        let _ = w.body_end(2, f2);
        for id in [1, 2] {
            assert_eq!(
                fields(&only_record(&w, id)),
                (AGENT, VERSION, "store", "injected"),
                "request {id}"
            );
        }
    }

    #[test]
    fn a_traced_request_s_lookups_carry_its_traceparent() {
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let w = W::new(&SharedData::default(), config(""));
        let (mut head, eos) = head(Some(AGENT));
        head.traceparent = Some(trace.into());
        let (flow, _) = w.headers_with(1, (head.clone(), eos));
        assert_eq!(w.host.last_callout().1.traceparent.as_deref(), Some(trace));
        let (flow, _) = w.answer(1, flow, redis_miss());
        assert_eq!(w.host.last_callout().1.cluster, "ibex_store");
        assert_eq!(w.host.last_callout().1.traceparent.as_deref(), Some(trace));
        let _ = w.answer(1, flow, store_answer(Some("D")));
        on_root_tick(&w.ctx(ROOT));
        let write = w.host.last_callout().1;
        assert!(
            write.path.contains("EVAL"),
            "the write-back: {}",
            write.path
        );
        assert_eq!(write.traceparent.as_deref(), Some(trace));
        // A malformed one is not passed on.
        let w = W::new(&SharedData::default(), config(""));
        head.traceparent = Some(format!("{trace}\r\nx-injected: 1"));
        let _ = w.headers_with(1, (head, eos));
        assert_eq!(w.host.last_callout().1.traceparent, None);
    }
}

/// The agent's L1 key.
fn agent_key() -> String {
    crate::entry::key_for(&crate::agent::AgentId::parse(AGENT).unwrap())
}

/// How many times `w` read the agent's entry from shared data.
fn entry_reads(w: &W) -> usize {
    let key = agent_key();
    w.host
        .shared_reads
        .borrow()
        .iter()
        .filter(|k| **k == key)
        .count()
}

/// The agent's tombstone, written as an older control role would: no epoch bump.
fn tombstone_without_bump(w: &W) {
    let tomb = Entry {
        kind: Kind::Tombstone,
        fresh_until_ms: 0,
        generation: crate::entry::current_generation(&w.host),
        escaped: ibex_wire::Redacted::new(""),
        version: crate::audit::Version::Unknown,
    };
    w.host
        .shared_set(&agent_key(), &tomb.encode(), None)
        .unwrap();
}

fn invalidate(w: &W) {
    let r = crate::control::handle(
        Some("POST"),
        Some(&format!("/ibex/v1/invalidate/{AGENT}")),
        None,
        &w.host,
        &w.config,
    );
    assert_eq!(r.status, 204);
}

#[test]
fn a_warm_hit_is_served_from_the_workers_copy_without_reading_the_entry() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    crate::control::start_epoch(&w.host).unwrap();
    w.run(1, vec![redis_hit("D")]);
    w.run(2, vec![]);
    let before = entry_reads(&w);
    w.run(3, vec![]);
    assert!(w.body(3).contains("\"D\""), "{}", w.body(3));
    assert_eq!(entry_reads(&w), before, "no read of the entry");
    assert_eq!(w.host.counter(Counter::L1Hit), 2);
    assert_eq!(w.host.counter(Counter::Injected), 3);
}

#[test]
fn no_copy_is_kept_when_worker_copy_bytes_is_zero() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","cache":{"worker_copy_bytes":0}"#));
    w.run(1, vec![redis_hit("D")]);
    w.run(2, vec![]);
    let before = entry_reads(&w);
    w.run(3, vec![]);
    assert_eq!(entry_reads(&w), before + 1);
    assert!(!w
        .host
        .shared_reads
        .borrow()
        .iter()
        .any(|k| k == crate::entry::EPOCH_KEY));
}

/// Every worker's copy ends with an invalidation made on any worker, and with a
/// flush: the next request of the first worker asks Redis again, and the second
/// worker's serves what that fill put into L1, not its own old copy.
#[test]
fn an_invalidation_or_a_flush_ends_every_workers_copy_at_once() {
    for flush in [false, true] {
        let shared = SharedData::default();
        let w1 = W::new(&shared, config(""));
        let w2 = W::new(&shared, config(""));
        w1.run(1, vec![redis_hit("old")]);
        for w in [&w1, &w2] {
            w.run(2, vec![]);
            w.run(3, vec![]);
        }
        if flush {
            crate::control::invalidate_all(&w1.host).unwrap();
        } else {
            invalidate(&w1);
        }
        let calls = w1.host.callouts.borrow().len();
        w1.run(4, vec![redis_hit("new")]);
        assert_eq!(w1.host.callouts.borrow().len(), calls + 1, "asked Redis");
        w2.run(4, vec![]);
        for w in [&w1, &w2] {
            assert!(
                w.body(4).contains("\"new\""),
                "flush {flush}: {}",
                w.body(4)
            );
        }
    }
}

#[test]
fn a_copy_expires_with_its_entry() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(r#","cache":{"ttl_seconds":1}"#));
    crate::control::start_epoch(&w.host).unwrap();
    w.run(1, vec![redis_hit("D")]);
    w.run(2, vec![]);
    w.host.now.set(w.host.now.get() + 999);
    w.run(3, vec![]);
    assert_eq!(w.host.counter(Counter::L1Hit), 2);
    w.host.now.set(w.host.now.get() + 1);
    let (_, action) = w.headers(4);
    assert_eq!(action, Action::Pause, "expired with the entry, to the ms");
    assert_eq!(w.host.counter(Counter::L1Miss), 2);
}

/// An invalidation that lands after a request read the entry but before it kept
/// its copy: that request was served (it read first), the next one is not.
#[test]
fn an_invalidation_landing_while_a_copy_is_taken_ends_that_copy() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    crate::control::start_epoch(&w.host).unwrap();
    w.run(1, vec![redis_hit("old")]);
    let control = W::new(&shared, config(""));
    let control = std::rc::Rc::new(control);
    let hook = control.clone();
    *w.host.after_read.borrow_mut() = Some((agent_key(), Box::new(move || invalidate(&hook))));
    w.run(2, vec![]);
    assert!(w.host.after_read.borrow().is_none(), "the invalidation ran");
    assert!(w.body(2).contains("\"old\""));
    let (_, action) = w.headers(3);
    assert_eq!(
        action,
        Action::Pause,
        "the copy taken before the bump does not serve"
    );
}

/// Shared data that cannot say the epoch keeps no copy from serving on a stale one.
#[test]
fn an_unreadable_epoch_serves_no_copy() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    crate::control::start_epoch(&w.host).unwrap();
    w.run(1, vec![redis_hit("D")]);
    w.run(2, vec![]);
    w.host
        .shared_set(crate::entry::EPOCH_KEY, b"garbage", None)
        .unwrap();
    let before = entry_reads(&w);
    w.run(3, vec![]);
    assert_eq!(entry_reads(&w), before + 1, "read from shared data");
    // A tombstone written behind the epoch's back is then seen at once.
    tombstone_without_bump(&w);
    let (_, action) = w.headers(4);
    assert_eq!(action, Action::Pause);
}

// ---------------------------------------------------------------- review (attacker)

/// Pre-existing (not from 68748e7/6af0b91), found while checking every writer:
/// the "older generation replaces" rule of `l1::write` resurrects a directive an
/// acknowledged invalidation ended. G reads the generation (0) before a flush and
/// the entry after the agent's tombstone; F anchors between the flush (gen 1) and
/// the tombstone, so its L2 GET may read the old text. G's fill (anchored on the
/// tombstone, new text) is written with generation 0; F's answer then loses the CAS
/// race but finds an entry of an older generation that is no tombstone, and writes
/// its old text over it, fresh under generation 1.
#[test]
fn the_older_generation_rule_never_brings_back_what_an_invalidation_ended() {
    use std::rc::Rc;
    let shared = SharedData::default();
    let wg = W::new(&shared, config(""));
    let wf = Rc::new(W::new(&shared, config("")));
    let f_flow: Rc<RefCell<Option<Flow>>> = Rc::new(RefCell::new(None));
    {
        let (wf, f_flow) = (wf.clone(), f_flow.clone());
        *wg.host.after_read.borrow_mut() = Some((
            crate::entry::GENERATION_KEY.to_string(),
            Box::new(move || {
                // G has read generation 0; before it reads the agent's entry:
                crate::control::invalidate_all(&wf.host).unwrap(); // flush: gen 1
                let (flow, action) = wf.headers(1); // F anchors at gen 1, GET leaves
                assert_eq!(action, Action::Pause);
                *f_flow.borrow_mut() = Some(flow);
                invalidate(&wf); // the agent's tombstone + epoch bump: 204
            }),
        ));
    }
    let (g, action) = wg.headers(1);
    assert_eq!(action, Action::Pause);
    assert!(wg.host.after_read.borrow().is_none(), "the hook ran");
    // G's GET left after the tombstone (and after the companion's L2 tombstone).
    let (g, _) = wg.answer(1, g, redis_hit("new"));
    wg.body_end(1, g);
    assert!(wg.body(1).contains("\"new\""));
    // F's GET left before the L2 tombstone: the old text.
    let flow = f_flow.borrow_mut().take().unwrap();
    let (flow, _) = wf.answer(1, flow, redis_hit("old"));
    wf.body_end(1, flow);
    // Any later request, on any worker, after the 204.
    let wh = W::new(&shared, config(""));
    let (flow, action) = wh.headers(1);
    let flow = match action {
        Action::Continue => flow,
        _ => wh.answer(1, flow, redis_hit("new")).0,
    };
    wh.body_end(1, flow);
    assert!(
        wh.body(1).contains("\"new\""),
        "after the 204 the provider gets: {}",
        wh.body(1)
    );
}

/// An L1 writer that does not bump the epoch (a control role of an older build
/// during an upgrade) never made one: then no worker serves a copy, and the
/// tombstone alone is seen by the next request.
#[test]
fn copies_serve_only_once_a_control_role_made_the_epoch() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    w.run(1, vec![redis_hit("old")]);
    // No epoch: no copy.
    w.run(2, vec![]);
    // The previous build's control role: the tombstone only.
    tombstone_without_bump(&w);
    let (_, action) = w.headers(3);
    assert_eq!(
        action,
        Action::Pause,
        "the tombstone is not seen: {}",
        w.body(3)
    );
}

/// An epoch that became unreadable is replaced by one no copy carries: a copy
/// stamped before does not serve again after the next invalidation.
#[test]
fn a_malformed_epoch_is_never_bumped_back_to_a_value_copies_carry() {
    let shared = SharedData::default();
    let w = W::new(&shared, config(""));
    crate::control::start_epoch(&w.host).unwrap();
    // Some other agent's invalidation: the epoch is 1.
    let other = "11111111-2222-4333-8444-555555555555";
    let r = crate::control::handle(
        Some("POST"),
        Some(&format!("/ibex/v1/invalidate/{other}")),
        None,
        &w.host,
        &w.config,
    );
    assert_eq!(r.status, 204);
    w.run(1, vec![redis_hit("old")]);
    w.run(2, vec![]); // copy stamped 1
                      // The epoch becomes unreadable (any writer of the vm_id's shared data).
    w.host
        .shared_set(crate::entry::EPOCH_KEY, b"garbage", None)
        .unwrap();
    invalidate(&w); // tombstone, then bump: garbage -> 0 -> 1
    let (flow, action) = w.headers(3);
    if action == Action::Continue {
        w.body_end(3, flow);
    }
    assert_eq!(
        action,
        Action::Pause,
        "served the copy after the 204: {}",
        w.body(3)
    );
}

#[test]
fn no_audit_record_is_written_when_filter_state_is_off() {
    let shared = SharedData::default();
    let on = W::new(&shared, config(""));
    on.run(1, vec![redis_hit("D")]);
    assert_eq!(on.host.req(1).audits.len(), 1);
    assert_eq!(
        on.host.req(1).audit_layouts,
        vec![crate::audit::Layout::Combined],
        "one property by default"
    );
    let fields = W::new(&shared, config(r#","audit":{"filter_state":"fields"}"#));
    fields.run(1, vec![]);
    assert_eq!(
        fields.host.req(1).audit_layouts,
        vec![crate::audit::Layout::Fields]
    );
    let off = W::new(&shared, config(r#","audit":{"filter_state":"off"}"#));
    off.run(1, vec![]);
    assert!(off.body(1).contains("\"D\""));
    assert!(off.host.req(1).audits.is_empty());
}

/// The running context's own answer reaches it wherever it stands among the
/// participants (the host acts on the context last switched to).
#[test]
fn the_running_context_gets_its_own_answer_whatever_its_place_among_participants() {
    use crate::worker::{BodySeen, Participant, Then};
    let w = W::new(&SharedData::default(), config(""));
    w.host.add_request(2, BODY.as_bytes());
    w.host.add_request(3, BODY.as_bytes());
    let ctx = w.ctx(3);
    let p = |id| Participant {
        id,
        then: Then::Pass,
        body: BodySeen::NotYet,
    };
    let _ = deliver::complete(
        vec![p(2), p(3)],
        deliver::Outcome::Refuse(Refusal::DirectiveUnavailable),
        deliver::Source::Local,
        &ctx,
    );
    assert!(
        w.host.req(3).reply.is_some(),
        "the running context's refusal"
    );
    assert!(w.host.req(2).reply.is_some(), "the other participant's");
    assert_eq!(w.host.current.get(), 3, "switched back");
}
