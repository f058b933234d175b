//! State one worker VM shares between its requests, and the rules that keep it
//! consistent: the fills in flight (so concurrent misses for one agent, or for one
//! gateway key, make one fill), which fill each callout answer belongs to, what finished fills delivered to
//! requests that have not run since, the L2 write-backs the root context sends, and
//! the circuit breakers of the two remote tiers.
//!
//! A worker VM runs on one Envoy thread, so this state needs no locking; it is owned
//! by the root context and lent to each callback. It is never shared across workers
//! (that is what L1 shared data is for). Every field is private: the request flow
//! (`crate::flow`) moves fills through the methods below, which keep the indexes
//! (tokens, joinable fills) in step with the fills themselves.
//!
//! This module knows nothing of the flow's states and makes no host calls.

use std::collections::HashMap;
use std::rc::Rc;

use crate::agent::AgentId;
use crate::apikey::KeyHash;
use crate::breaker::Breaker;
use crate::config::{Config, Route};
use crate::entry::Known;
use crate::idmap::{IdMap, IdSet};
use crate::inject::Format;
use crate::reply::Refusal;
use crate::tiers::Callout;
use ibex_wire::Redacted;

/// The remote tier a callout goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// L2: Redis behind its HTTP front.
    Redis,
    /// L3: the companion store.
    Store,
}

/// How much of its body a request had delivered when it last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySeen {
    /// Nothing yet.
    NotYet,
    /// Some, not the end.
    Partial,
    /// All of it, this many bytes (buffered, headers still held).
    Complete(usize),
}

/// What a fill resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// An agent's directive.
    Directive(AgentId),
    /// Which agent a gateway key belongs to (`agent.source = "api_key"`); the key is
    /// known only by its hash.
    Key(KeyHash),
}

/// Logs name the agent, or the key's hash prefix; never a directive or a key.
impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Directive(agent) => write!(f, "agent {agent}"),
            Subject::Key(key) => write!(f, "key {key}"),
        }
    }
}

/// What a request does once the answer it waits for is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Its directive goes into the body in this format. A request waiting for its
    /// key's agent resolves that agent's directive next.
    Inject(Format),
    /// It is forwarded untouched (its headers said so: no body, a pass path), once
    /// its key is known to be good.
    Pass,
    /// It is refused with this (its headers said so), once its key is known to be
    /// good: a bad key is answered as a bad key first.
    Refuse(Refusal),
}

/// A request waiting for a fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// Its context id.
    pub id: u32,
    /// What it does with the answer.
    pub then: Then,
    /// How much of its body it has.
    pub body: BodySeen,
}

/// An expired entry kept in case L2 and L3 both fail.
#[derive(Debug, Clone)]
pub struct Stale {
    /// What the entry said.
    pub known: Known,
    /// Usable until this instant (ms).
    pub usable_until_ms: u64,
}

/// What a fill is checked against: the L1 key's CAS version and the global
/// generation when it started. An invalidation changes one of them, so a fill that
/// it overtook can neither be joined nor write its answer over what came after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// CAS version of the L1 key (`None` if it could not be anchored).
    pub cas: Option<u32>,
    /// Global generation.
    pub generation: u64,
}

impl Anchor {
    /// Whether a request that found the key at `now` may share this fill's answer:
    /// nothing invalidated the agent since the fill started. An unanchored fill
    /// (`provisional`, below) is shared only by requests that found the key exactly
    /// as it did, absent included: an invalidation always writes the key, so it
    /// always changes what a later request finds.
    fn admits(&self, now: &Anchor, provisional: bool) -> bool {
        (self.cas.is_some() || provisional) && self == now
    }
}

/// One resolution of one agent's directive, or of one key's agent, in flight on
/// this worker.
#[derive(Debug)]
pub struct Fill {
    /// What it resolves.
    pub subject: Subject,
    /// Its L1 key.
    pub key: String,
    /// What it is checked against.
    pub anchor: Anchor,
    /// Expired entry to fall back on.
    pub stale: Option<Stale>,
    /// A gateway key's first look, unanchored: nothing is written to L1 for it, so
    /// keys nobody issued leave nothing behind in shared data (which cannot be
    /// deleted). A "no such key" answer ends it; an agent's answer is asked again
    /// under an anchor before anything is cached or served (`fill` explains why).
    pub provisional: bool,
    /// The anchored second look after a provisional one (its answers are not
    /// counted again).
    pub confirming: bool,
    /// Requests waiting for the answer, the one that started the fill included.
    pub participants: Vec<Participant>,
}

/// Identifies a fill on its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FillId(u64);

/// Whether requests that arrive now may still join a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joining {
    /// Yes: it is the agent's current fill on this worker.
    Open,
    /// No: an invalidation overtook it (or a newer fill replaced it).
    Closed,
}

/// A fill taken out of the worker to be moved on; gives it back under the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The fill's id, which its participants wait on.
    pub id: FillId,
    /// Whether it was joinable when taken.
    pub joining: Joining,
}

/// Where a registered fill's callout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callback {
    /// In flight; its answer arrives in context `owner` (Envoy routes an answer to
    /// the context that dispatched it).
    Awaited { tier: Tier, token: u32, owner: u32 },
    /// The owner went away, so the SDK will drop the answer; the root context asks
    /// `tier` again on its next tick.
    Orphaned { tier: Tier },
}

#[derive(Debug)]
struct Slot {
    fill: Fill,
    callback: Callback,
}

/// What a finished fill did for a request that has not run since; the request picks
/// it up on its next callback.
#[derive(Debug)]
pub enum Delivered {
    /// Resumed with nothing to splice.
    Forwarded,
    /// Answered with a local reply.
    Refused,
    /// Resumed; the directive goes into the body once it is complete.
    Inject(Injection),
    /// Its key's agent is known; it now waits for that agent's directive fill.
    Waiting(FillId),
}

/// A directive waiting for its request's body.
#[derive(Debug)]
pub struct Injection {
    /// Where it goes.
    pub format: Format,
    /// The directive, JSON-escaped.
    pub escaped: Redacted<Rc<str>>,
}

/// How many request paths' routes a worker remembers (then it starts over).
pub const ROUTES_KEPT: usize = 256;
/// Longer paths are routed every time, not remembered.
pub const ROUTE_PATH_MAX: usize = 512;

/// Per-worker shared state.
#[derive(Debug, Default)]
pub struct Worker {
    /// Hot copies of fresh L1 answers (`crate::hot`), read by `flow::l1` only.
    pub hot: crate::hot::Hot,
    /// The routes of recent request paths (`Config::route` is pure, and clients use
    /// a handful of paths): bounded by [`ROUTES_KEPT`] paths of at most
    /// [`ROUTE_PATH_MAX`] bytes, since anyone can send any path.
    routes: HashMap<String, Route>,
    fills: IdMap<FillId, Slot>,
    /// The fill of each L1 key that new requests may still join.
    joinable: HashMap<String, FillId>,
    /// Which fill a callout token belongs to.
    tokens: IdMap<u32, FillId>,
    next_fill: u64,
    /// L2 write-backs waiting for the root context, which sends them on its tick so
    /// that their answers come back to a context that lives as long as the VM.
    queued_writes: Vec<Callout>,
    /// Tokens of L2 write-backs in flight, to count how they end.
    writes: IdSet<u32>,
    delivered: IdMap<u32, Delivered>,
    /// Gateway keys known to be unknown or revoked: until when, and the global
    /// generation of the answer. Kept per worker, in the VM, and bounded, because
    /// anyone can present any number of made-up keys; shared data would keep every
    /// one of them for the life of the process.
    unknown_keys: HashMap<KeyHash, (u64, u64)>,
    redis: Breaker,
    store: Breaker,
    /// Per request context: its audit record so far, until the request ends.
    audits: IdMap<u32, Audit>,
}

/// What one request's audit trail holds while it runs.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Agent, version and tier, as they become known.
    pub record: crate::audit::Record,
    /// The request's W3C `traceparent`, carried by the callouts its fills make.
    pub traceparent: Option<String>,
    /// The version the request was forwarded with (`x-ibex-directive-version`), once
    /// its outcome is recorded, with `audit.response_header` on.
    pub sent: Option<String>,
}

/// Most unknown keys a worker remembers; beyond that it forgets the expired ones,
/// or all of them (they are only a cache: Redis keeps them for the negative TTL too).
pub const MAX_UNKNOWN_KEYS: usize = 4096;

impl Worker {
    /// Request `ctx`'s audit trail (created empty).
    pub fn audit(&mut self, ctx: u32) -> &mut Audit {
        self.audits.entry(ctx).or_default()
    }

    /// Request `ctx`'s `traceparent`, if it came with a valid one.
    pub fn traceparent(&self, ctx: u32) -> Option<String> {
        self.audits.get(&ctx).and_then(|a| a.traceparent.clone())
    }

    /// `config.route(path)`, remembered. A worker serves one plugin, so `config` is
    /// always the same.
    pub fn route(&mut self, path: &str, config: &Config) -> Route {
        if let Some(route) = self.routes.get(path) {
            return *route;
        }
        let route = config.route(path);
        if path.len() <= ROUTE_PATH_MAX {
            if self.routes.len() >= ROUTES_KEPT {
                self.routes.clear();
            }
            self.routes.insert(path.to_owned(), route);
        }
        route
    }

    /// The version request `ctx` was forwarded with, once its outcome is recorded.
    pub fn sent_version(&self, ctx: u32) -> Option<&str> {
        self.audits.get(&ctx).and_then(|a| a.sent.as_deref())
    }

    /// The breaker of `tier`.
    pub fn breaker(&mut self, tier: Tier) -> &mut Breaker {
        match tier {
            Tier::Redis => &mut self.redis,
            Tier::Store => &mut self.store,
        }
    }

    /// Adds `p` to the agent's joinable fill if nothing invalidated the agent since
    /// it started (`now` is what the request found); gives `p` back otherwise.
    pub fn join(&mut self, key: &str, now: &Anchor, p: Participant) -> Result<FillId, Participant> {
        let Some(&id) = self.joinable.get(key) else {
            return Err(p);
        };
        match self.fills.get_mut(&id) {
            Some(slot) if slot.fill.anchor.admits(now, slot.fill.provisional) => {
                slot.fill.participants.push(p);
                Ok(id)
            }
            _ => Err(p),
        }
    }

    /// Registers a fill whose callout `token` to `tier` was dispatched by context
    /// `owner`: a new fill (joinable for its key) without a ticket, else the fill the
    /// ticket was given for, joinable as it was.
    pub fn register(
        &mut self,
        fill: Fill,
        ticket: Option<Ticket>,
        tier: Tier,
        token: u32,
        owner: u32,
    ) -> FillId {
        let (id, joining) = match ticket {
            Some(t) => (t.id, t.joining),
            None => {
                self.next_fill = self.next_fill.wrapping_add(1);
                (FillId(self.next_fill), Joining::Open)
            }
        };
        if joining == Joining::Open {
            self.joinable.insert(fill.key.clone(), id);
        }
        self.tokens.insert(token, id);
        let callback = Callback::Awaited { tier, token, owner };
        self.fills.insert(id, Slot { fill, callback });
        id
    }

    /// Takes out the fill that callout `token` belongs to, with the tier it asked.
    pub fn take_answered(&mut self, token: u32) -> Option<(Fill, Ticket, Tier)> {
        let id = self.tokens.get(&token).copied()?;
        let (fill, ticket, callback) = self.take(id)?;
        match callback {
            Callback::Awaited { tier, .. } => Some((fill, ticket, tier)),
            Callback::Orphaned { .. } => None,
        }
    }

    /// Takes out every fill whose answer will never arrive (its owner is gone) but
    /// that still has participants, with the tier to ask again.
    pub fn take_orphans(&mut self) -> Vec<(Fill, Ticket, Tier)> {
        let ids: Vec<FillId> = self
            .fills
            .iter()
            .filter(|(_, s)| matches!(s.callback, Callback::Orphaned { .. }))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((fill, ticket, Callback::Orphaned { tier })) = self.take(id) {
                out.push((fill, ticket, tier));
            }
        }
        out
    }

    fn take(&mut self, id: FillId) -> Option<(Fill, Ticket, Callback)> {
        let slot = self.fills.remove(&id)?;
        if let Callback::Awaited { token, .. } = slot.callback {
            self.tokens.remove(&token);
        }
        let joining = if self.joinable.get(&slot.fill.key) == Some(&id) {
            self.joinable.remove(&slot.fill.key);
            Joining::Open
        } else {
            Joining::Closed
        };
        Some((slot.fill, Ticket { id, joining }, slot.callback))
    }

    /// Request `ctx` stops waiting for fill `id` (it was refused meanwhile).
    pub fn leave(&mut self, id: FillId, ctx: u32) {
        if let Some(slot) = self.fills.get_mut(&id) {
            slot.fill.participants.retain(|p| p.id != ctx);
        }
    }

    /// Whether request `ctx`, waiting for fill `id`, will have a directive spliced
    /// into its body (its body is then held to `inject.max_body_bytes`).
    pub fn splices(&self, id: FillId, ctx: u32) -> bool {
        self.fills
            .get(&id)
            .and_then(|s| s.fill.participants.iter().find(|p| p.id == ctx))
            .map_or(true, |p| matches!(p.then, Then::Inject(_)))
    }

    /// Records how much body request `ctx` has while it waits for fill `id`; false if
    /// the fill does not know the request (any more).
    pub fn note_body(&mut self, id: FillId, ctx: u32, body: BodySeen) -> bool {
        self.fills
            .get_mut(&id)
            .and_then(|s| s.fill.participants.iter_mut().find(|p| p.id == ctx))
            .map(|p| p.body = body)
            .is_some()
    }

    /// Leaves what a finished fill did for request `ctx`, for its next callback.
    pub fn deliver(&mut self, ctx: u32, what: Delivered) {
        self.delivered.insert(ctx, what);
    }

    /// What a finished fill left for request `ctx`, if anything.
    pub fn take_delivered(&mut self, ctx: u32) -> Option<Delivered> {
        self.delivered.remove(&ctx)
    }

    /// Remembers that `key` is unknown or revoked until `until_ms`, as of generation
    /// `generation`.
    pub fn remember_unknown_key(
        &mut self,
        key: KeyHash,
        until_ms: u64,
        generation: u64,
        now_ms: u64,
    ) {
        if self.unknown_keys.len() >= MAX_UNKNOWN_KEYS {
            self.unknown_keys.retain(|_, (until, _)| *until > now_ms);
            if self.unknown_keys.len() >= MAX_UNKNOWN_KEYS {
                self.unknown_keys.clear();
            }
        }
        self.unknown_keys.insert(key, (until_ms, generation));
    }

    /// Whether `key` is known to be unknown or revoked at `now_ms`, under global
    /// generation `generation` (a flush forgets every earlier answer).
    pub fn is_unknown_key(&self, key: &KeyHash, now_ms: u64, generation: u64) -> bool {
        self.unknown_keys
            .get(key)
            .is_some_and(|(until, g)| now_ms < *until && *g >= generation)
    }

    /// How many unknown keys the worker remembers.
    pub fn unknown_key_count(&self) -> usize {
        self.unknown_keys.len()
    }

    /// Queues an L2 write-back for the root context.
    pub fn queue_write(&mut self, write: Callout) {
        self.queued_writes.push(write);
    }

    /// The queued write-backs, emptied.
    pub fn take_queued_writes(&mut self) -> Vec<Callout> {
        std::mem::take(&mut self.queued_writes)
    }

    /// A write-back was dispatched under `token`.
    pub fn track_write(&mut self, token: u32) {
        self.writes.insert(token);
    }

    /// Whether `token` is a write-back's (it is forgotten: its answer has come).
    pub fn finish_write(&mut self, token: u32) -> bool {
        self.writes.remove(&token)
    }

    /// A request is gone (finished or the client went away): forget it everywhere so
    /// that no fill waits on it or tries to resume it. A fill it dispatched becomes
    /// an orphan if others still wait for it, and is dropped if nobody does.
    pub fn forget(&mut self, ctx: u32) {
        self.delivered.remove(&ctx);
        self.audits.remove(&ctx);
        let mut emptied = Vec::new();
        for (id, slot) in self.fills.iter_mut() {
            slot.fill.participants.retain(|p| p.id != ctx);
            if let Callback::Awaited { tier, token, owner } = slot.callback {
                if owner == ctx {
                    self.tokens.remove(&token);
                    slot.callback = Callback::Orphaned { tier };
                }
            }
            if slot.fill.participants.is_empty()
                && matches!(slot.callback, Callback::Orphaned { .. })
            {
                emptied.push(*id);
            }
        }
        for id in emptied {
            self.take(id);
        }
    }

    /// Whether no request is waiting for anything: no fill, no callout token of a
    /// fill, nothing delivered and not picked up (write-backs aside).
    pub fn is_idle(&self) -> bool {
        self.fills.is_empty()
            && self.tokens.is_empty()
            && self.joinable.is_empty()
            && self.delivered.is_empty()
    }

    /// How many fills are registered, and how many of them are orphans.
    pub fn fill_counts(&self) -> (usize, usize) {
        let orphans = self
            .fills
            .values()
            .filter(|s| matches!(s.callback, Callback::Orphaned { .. }))
            .count();
        (self.fills.len(), orphans)
    }

    /// How many write-backs are queued for the root context, and how many are in
    /// flight.
    pub fn write_counts(&self) -> (usize, usize) {
        (self.queued_writes.len(), self.writes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_remembered_and_bounded() {
        let config = Config::parse(b"{}", None).unwrap();
        let mut w = Worker::default();
        let chat = "/v1/chat/completions";
        assert_eq!(w.route(chat, &config), config.route(chat));
        assert_eq!(w.route(chat, &config), config.route(chat), "remembered");
        assert_eq!(w.routes.len(), 1);
        let long = format!("/{}", "a".repeat(ROUTE_PATH_MAX));
        assert_eq!(w.route(&long, &config), config.route(&long));
        assert_eq!(w.routes.len(), 1, "a long path is not kept");
        for i in 0..ROUTES_KEPT + 10 {
            let path = format!("/v1/x{i}");
            assert_eq!(w.route(&path, &config), config.route(&path));
            assert!(w.routes.len() <= ROUTES_KEPT);
        }
    }

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    fn fill(participants: &[u32], cas: Option<u32>) -> Fill {
        Fill {
            subject: Subject::Directive(AgentId::parse(AGENT).unwrap()),
            key: crate::entry::key_for(&crate::agent::AgentId::parse(AGENT).unwrap()),
            anchor: Anchor { cas, generation: 0 },
            stale: None,
            provisional: false,
            confirming: false,
            participants: participants
                .iter()
                .map(|&id| Participant {
                    id,
                    then: Then::Inject(Format::OpenAiChat),
                    body: BodySeen::NotYet,
                })
                .collect(),
        }
    }

    fn participant(id: u32) -> Participant {
        fill(&[id], None).participants.remove(0)
    }

    #[test]
    fn joining_needs_the_same_anchor_and_an_open_fill() {
        let mut w = Worker::default();
        let key = crate::entry::key_for(&crate::agent::AgentId::parse(AGENT).unwrap());
        let anchor = Anchor {
            cas: Some(7),
            generation: 0,
        };
        let id = w.register(fill(&[1], Some(7)), None, Tier::Redis, 11, 1);
        assert_eq!(w.join(&key, &anchor, participant(2)), Ok(id));
        let moved = Anchor {
            cas: Some(8),
            generation: 0,
        };
        assert!(w.join(&key, &moved, participant(3)).is_err(), "CAS moved");
        let flushed = Anchor {
            cas: Some(7),
            generation: 1,
        };
        assert!(w.join(&key, &flushed, participant(3)).is_err(), "flushed");
        let unanchored = Anchor {
            cas: None,
            generation: 0,
        };
        let id2 = w.register(fill(&[4], None), None, Tier::Redis, 12, 4);
        assert!(w.join(&key, &unanchored, participant(5)).is_err());
        // The newer fill replaced the first as the joinable one; a ticket keeps that.
        let (_, ticket, tier) = w.take_answered(11).unwrap();
        assert_eq!((ticket.joining, tier), (Joining::Closed, Tier::Redis));
        let (_, ticket, _) = w.take_answered(12).unwrap();
        assert_eq!((ticket.id, ticket.joining), (id2, Joining::Open));
    }

    #[test]
    fn a_fill_asked_again_keeps_its_id_and_joinability() {
        let mut w = Worker::default();
        let id = w.register(fill(&[1], Some(1)), None, Tier::Redis, 11, 1);
        let (f, ticket, _) = w.take_answered(11).unwrap();
        assert!(w.take_answered(11).is_none(), "the token is gone with it");
        assert_eq!(w.register(f, Some(ticket), Tier::Store, 12, 1), id);
        let key = crate::entry::key_for(&crate::agent::AgentId::parse(AGENT).unwrap());
        let anchor = Anchor {
            cas: Some(1),
            generation: 0,
        };
        assert_eq!(w.join(&key, &anchor, participant(2)), Ok(id));
    }

    #[test]
    fn forgetting_the_owner_orphans_the_fill_or_drops_it() {
        let mut w = Worker::default();
        w.register(fill(&[1, 2], Some(1)), None, Tier::Store, 11, 1);
        w.forget(1);
        assert_eq!(w.fill_counts(), (1, 1));
        assert!(
            w.take_answered(11).is_none(),
            "the dropped answer maps to nothing"
        );
        let orphans = w.take_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].2, Tier::Store);
        assert_eq!(orphans[0].0.participants.len(), 1);
        assert!(w.is_idle());

        w.register(fill(&[1], Some(1)), None, Tier::Redis, 13, 1);
        w.forget(1);
        assert!(w.is_idle(), "nobody waits: dropped");
    }

    #[test]
    fn deliveries_and_writes_are_taken_once() {
        let mut w = Worker::default();
        w.deliver(3, Delivered::Forwarded);
        assert!(matches!(w.take_delivered(3), Some(Delivered::Forwarded)));
        assert!(w.take_delivered(3).is_none());
        w.track_write(9);
        assert_eq!(w.write_counts(), (0, 1));
        assert!(w.finish_write(9));
        assert!(!w.finish_write(9));
        assert_eq!(w.write_counts(), (0, 0));
        w.deliver(4, Delivered::Refused);
        w.forget(4);
        assert!(w.is_idle());
    }
}
