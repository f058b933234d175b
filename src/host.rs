//! The one seam between the pure filter and Envoy: every host call the request flow
//! needs, behind a small trait. The wasm build implements it with proxy-wasm calls
//! (`crate::envoy`); tests implement it in memory (`fake::FakeHost`, compiled for tests only).
//!
//! proxy-wasm's `Status` never crosses this boundary: implementations turn it into
//! [`HostError`].

use crate::metrics::Counter;
use crate::tiers::Callout;

/// A host call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// A shared-data write lost a compare-and-swap race.
    CasMismatch,
    /// The thing asked for does not exist (for example an unknown cluster).
    NotFound,
    /// The host refused the arguments.
    BadArgument,
    /// Any other failure.
    Failed,
}

/// Value and CAS version of a shared-data key (`cas` is `None` when absent).
pub type Shared = (Option<Vec<u8>>, Option<u32>);

/// Host calls used while handling one request.
pub trait Host {
    /// Wall-clock time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Reads a shared-data key.
    fn shared_get(&self, key: &str) -> Result<Shared, HostError>;
    /// Writes a shared-data key; with `cas`, only if the key is still at that version.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;
    /// Starts an HTTP callout; its answer arrives later under the returned token.
    fn dispatch(&self, call: &Callout) -> Result<u32, HostError>;
    /// The buffered request body (its first `size` bytes).
    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError>;
    /// Replaces the whole buffered request body, `old_len` bytes long.
    fn replace_request_body(&self, old_len: usize, body: &[u8]) -> Result<(), HostError>;
    /// Sets (`Some`) or removes (`None`) a request header; only while headers are held.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// Answers the client directly with a JSON body; the request goes no further.
    fn send_json_reply(&self, status: u16, body: &str) -> Result<(), HostError>;
    /// Lets a paused request continue.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Makes request `context_id` the one later calls act on (headers, body, reply,
    /// resume), so a fill can answer every request that waited for it.
    fn switch_to(&self, context_id: u32) -> Result<(), HostError>;
    /// Increments a counter.
    fn count(&self, counter: Counter);
    /// Reads a property of the current request (`["metadata", "filter_metadata",
    /// namespace, key, …]`): `None` when it does not exist. A string comes back as its
    /// raw bytes; anything else as the host serializes it.
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    /// Records the current request's audit fields where Envoy's access log reads
    /// them (filter state `wasm.ibex.audit`, or `wasm.ibex.<field>` each), laid
    /// out as `layout` says (never `Off`).
    fn record_audit(
        &self,
        fields: &crate::audit::Fields,
        layout: crate::audit::Layout,
    ) -> Result<(), HostError>;
}

#[cfg(test)]
pub mod fake {
    //! An in-memory host for native tests: shared data with real CAS semantics
    //! (as in proxy-wasm-cpp-host: CAS is checked only for keys that exist), recorded
    //! callouts, a settable clock and a request with headers and a body.

    use super::*;
    use std::cell::{Cell, Ref, RefCell, RefMut};
    use std::collections::HashMap;
    use std::rc::Rc;

    #[derive(Default)]
    struct Map {
        entries: HashMap<String, (Vec<u8>, u32)>,
        last_cas: u32,
    }

    /// Shared data, shareable between several fake hosts like Envoy's workers.
    #[derive(Default, Clone)]
    pub struct SharedData(Rc<RefCell<Map>>);

    impl SharedData {
        /// Raw value of a key.
        pub fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.0.borrow().entries.get(key).map(|(v, _)| v.clone())
        }
        /// Every key, in no particular order.
        pub fn keys(&self) -> Vec<String> {
            self.0.borrow().entries.keys().cloned().collect()
        }
    }

    /// Code run by a fake host call.
    pub type Hook = Box<dyn FnOnce()>;

    /// What the host knows of one request context.
    #[derive(Default, Debug)]
    pub struct FakeRequest {
        pub headers: HashMap<String, String>,
        pub body: Vec<u8>,
        pub reply: Option<(u16, String)>,
        pub resumed: u32,
        /// Every audit record written for this request (one is right), with its layout.
        pub audits: Vec<crate::audit::Fields>,
        pub audit_layouts: Vec<crate::audit::Layout>,
    }

    /// One fake worker: its request contexts, the one host calls act on, callouts
    /// and counters, and shared data (shareable with other fake workers).
    #[derive(Default)]
    pub struct FakeHost {
        pub now: Cell<u64>,
        pub shared: SharedData,
        pub callouts: RefCell<Vec<(u32, Callout)>>,
        /// The context each callout was dispatched in (`current` at the time).
        pub dispatched_in: RefCell<Vec<u32>>,
        pub next_token: Cell<u32>,
        pub fail_dispatch_to: RefCell<Vec<String>>,
        pub requests: RefCell<HashMap<u32, FakeRequest>>,
        pub current: Cell<u32>,
        pub counters: RefCell<HashMap<&'static str, u64>>,
        /// Properties by path (`metadata.filter_metadata…` joined by `.`), and the
        /// paths that were read.
        pub properties: RefCell<HashMap<String, Vec<u8>>>,
        pub properties_read: RefCell<Vec<String>>,
        /// Every shared-data key read, in order.
        pub shared_reads: RefCell<Vec<String>>,
        /// Runs once, right after the next read of this key (to land a concurrent
        /// write between two reads of a lookup).
        pub after_read: RefCell<Option<(String, Hook)>>,
    }

    impl FakeHost {
        pub fn with_shared(shared: SharedData) -> Self {
            let host = FakeHost {
                shared,
                now: Cell::new(1_000_000),
                ..Default::default()
            };
            host.add_request(1, b"");
            host.current.set(1);
            host
        }
        /// A new request context with its body.
        pub fn add_request(&self, id: u32, body: &[u8]) {
            let req = FakeRequest {
                body: body.to_vec(),
                ..Default::default()
            };
            self.requests.borrow_mut().insert(id, req);
        }
        /// The request context `id`.
        pub fn req(&self, id: u32) -> Ref<'_, FakeRequest> {
            Ref::map(self.requests.borrow(), |m| &m[&id])
        }
        fn cur(&self) -> RefMut<'_, FakeRequest> {
            let id = self.current.get();
            RefMut::map(self.requests.borrow_mut(), |m| {
                m.get_mut(&id).expect("no such request")
            })
        }
        pub fn counter(&self, c: Counter) -> u64 {
            self.counters.borrow().get(c.name()).copied().unwrap_or(0)
        }
        pub fn last_callout(&self) -> (u32, Callout) {
            self.callouts.borrow().last().cloned().expect("no callout")
        }
    }

    impl Host for FakeHost {
        fn now_ms(&self) -> u64 {
            self.now.get()
        }
        fn shared_get(&self, key: &str) -> Result<Shared, HostError> {
            self.shared_reads.borrow_mut().push(key.to_string());
            let read = match self.shared.0.borrow().entries.get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            };
            let due = matches!(&*self.after_read.borrow(), Some((k, _)) if k == key);
            if due {
                if let Some((_, hook)) = self.after_read.borrow_mut().take() {
                    hook();
                }
            }
            Ok(read)
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
            let mut data = self.shared.0.borrow_mut();
            data.last_cas += 1;
            let next = data.last_cas;
            match data.entries.get_mut(key) {
                Some(existing) => {
                    if matches!(cas, Some(c) if c != 0 && c != existing.1) {
                        return Err(HostError::CasMismatch);
                    }
                    *existing = (value.to_vec(), next);
                }
                None => {
                    data.entries.insert(key.to_string(), (value.to_vec(), next));
                }
            }
            Ok(())
        }
        fn dispatch(&self, call: &Callout) -> Result<u32, HostError> {
            if self.fail_dispatch_to.borrow().contains(&call.cluster) {
                return Err(HostError::BadArgument);
            }
            let token = self.next_token.get() + 1;
            self.next_token.set(token);
            self.callouts.borrow_mut().push((token, call.clone()));
            self.dispatched_in.borrow_mut().push(self.current.get());
            Ok(token)
        }
        fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
            let req = self.cur();
            Ok(req.body[..size.min(req.body.len())].to_vec())
        }
        fn replace_request_body(&self, old_len: usize, body: &[u8]) -> Result<(), HostError> {
            let mut req = self.cur();
            assert_eq!(old_len, req.body.len(), "must replace the whole body");
            req.body = body.to_vec();
            Ok(())
        }
        fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
            let mut req = self.cur();
            match value {
                Some(v) => req.headers.insert(name.to_string(), v.to_string()),
                None => req.headers.remove(name),
            };
            Ok(())
        }
        fn send_json_reply(&self, status: u16, body: &str) -> Result<(), HostError> {
            self.cur().reply = Some((status, body.to_string()));
            Ok(())
        }
        fn resume_request(&self) -> Result<(), HostError> {
            self.cur().resumed += 1;
            Ok(())
        }
        fn switch_to(&self, context_id: u32) -> Result<(), HostError> {
            if !self.requests.borrow().contains_key(&context_id) {
                return Err(HostError::NotFound);
            }
            self.current.set(context_id);
            Ok(())
        }
        fn count(&self, counter: Counter) {
            *self
                .counters
                .borrow_mut()
                .entry(counter.name())
                .or_default() += 1;
        }
        fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
            let key = path.join(".");
            self.properties_read.borrow_mut().push(key.clone());
            Ok(self.properties.borrow().get(&key).cloned())
        }
        fn record_audit(
            &self,
            fields: &crate::audit::Fields,
            layout: crate::audit::Layout,
        ) -> Result<(), HostError> {
            let mut requests = self.requests.borrow_mut();
            let req = requests
                .get_mut(&self.current.get())
                .ok_or(HostError::NotFound)?;
            req.audits.push(fields.clone());
            req.audit_layouts.push(layout);
            Ok(())
        }
    }
}
