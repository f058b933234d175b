//! The REST front's request language, pure: how a request's bytes become one
//! Redis command (or a pipeline of them), and which commands a token may run.
//!
//! Three request forms carry a command, as Upstash documents them: a JSON array
//! body (`["SET","k","v","EX",100]`), a JSON array of such arrays for
//! `/pipeline`, and the path form `/set/k/v?EX=100` (percent-decoded segments, then
//! a POST body as one more argument, then query parameters as `name`, `value`
//! pairs). Every form yields the same argument list, which [`parse`] checks
//! against the allowlist (`GET`, `SET` with `EX` (and `NX`), `DEL`, `EVAL` of the
//! filter's scripts, `PING`) and against the token's [`Role`]: the filter's token
//! runs only what the filter sends (`PING`, `GET` and `EVAL` of
//! [`ibex_wire::FILTER_SCRIPTS`] on the filter's keys, the write script with a TTL
//! in range), the admin token the whole allowlist on any key. Anything else is
//! refused here, so Redis never sees it.
//!
//! Sizes are counted while the JSON is read ([`Limits`]): past a cap the reader
//! stops at once with a 400, so a body of a million empty commands costs a
//! thousand, never a million allocations.
//!
//! What it must never do: put an argument into a message (arguments are
//! directive text, keys and tokens; every message here is fixed, names the
//! command or a configured limit only), touch the network, allocate ahead from a
//! count the client wrote, or accept an argument shape Redis would read
//! differently from what was checked (numbers are re-spelled canonically).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// Why a request was refused before reaching Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a command this front runs (403): the name or the script is not
    /// allowed.
    Forbidden(&'static str),
    /// Malformed: not JSON, wrong shape, wrong arguments (400). The message is
    /// fixed or names the command, never an argument.
    BadRequest(String),
}

impl Refusal {
    fn bad(msg: impl Into<String>) -> Self {
        Refusal::BadRequest(msg.into())
    }
}

/// The commands the front runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `GET key`
    Get,
    /// `SET key value [EX seconds] [NX]`
    Set,
    /// `DEL key [key …]`
    Del,
    /// `EVAL script numkeys key… arg…` (the filter's scripts unless told
    /// otherwise)
    Eval,
    /// `PING [message]`
    Ping,
}

impl Verb {
    /// Every verb, in the order metrics list them.
    pub const ALL: [Verb; 5] = [Verb::Get, Verb::Set, Verb::Del, Verb::Eval, Verb::Ping];

    /// Lower-case name: metric label, log field and error messages.
    pub fn label(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Set => "set",
            Verb::Del => "del",
            Verb::Eval => "eval",
            Verb::Ping => "ping",
        }
    }

    /// The name sent to Redis.
    pub fn redis_name(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Set => "SET",
            Verb::Del => "DEL",
            Verb::Eval => "EVAL",
            Verb::Ping => "PING",
        }
    }

    fn from_name(name: &[u8]) -> Option<Verb> {
        Verb::ALL
            .into_iter()
            .find(|v| name.eq_ignore_ascii_case(v.redis_name().as_bytes()))
    }
}

/// Which token a request carried: what [`parse`] lets it run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The filter's token (`--token`): `PING`, `GET` and `EVAL` of the filter's
    /// scripts, only on the filter's keys (`{key_prefix}…`, `agent_key:…`), and
    /// the write script only with a TTL in range and its entry's slot marker as
    /// second key. A leaked filter token can read
    /// and fill the cache, not empty it or write outside it.
    Filter,
    /// The operators' token (`--admin-token`): the whole allowlist on any key
    /// (`SET` still only with `EX`), and any script with `--allow-any-script`.
    Admin,
}

impl Role {
    /// Lower-case name, for the log line.
    pub fn label(self) -> &'static str {
        match self {
            Role::Filter => "filter",
            Role::Admin => "admin",
        }
    }
}

/// What [`parse`] lets through for one token.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Whose request it is.
    pub role: Role,
    /// Run any `EVAL` script, not only [`ibex_wire::FILTER_SCRIPTS`]. Honoured
    /// for [`Role::Admin`] only: the filter never sends another script.
    pub allow_any_script: bool,
    /// The filter's `redis.key_prefix`: with `agent_key:`, the keys
    /// [`Role::Filter`] may reach.
    pub key_prefix: String,
}

impl Policy {
    /// The filter token's policy over keys under `key_prefix`.
    pub fn filter(key_prefix: impl Into<String>) -> Self {
        Self {
            role: Role::Filter,
            allow_any_script: false,
            key_prefix: key_prefix.into(),
        }
    }

    /// The admin token's policy.
    pub fn admin(key_prefix: impl Into<String>, allow_any_script: bool) -> Self {
        Self {
            role: Role::Admin,
            allow_any_script,
            key_prefix: key_prefix.into(),
        }
    }

    /// A key the filter uses: a directive entry, a gateway key entry, or either
    /// one's flush marker.
    fn in_filter_scope(&self, key: &[u8]) -> bool {
        key.starts_with(self.key_prefix.as_bytes())
            || key.starts_with(ibex_wire::AGENT_KEY_PREFIX.as_bytes())
    }

    /// `{key_prefix}__flush__…` or `agent_key:__flush__…`: the subscriber's
    /// per-slot markers, which the filter only ever names as the write
    /// script's second key.
    fn is_flush_marker(&self, key: &[u8]) -> bool {
        [self.key_prefix.as_str(), ibex_wire::AGENT_KEY_PREFIX]
            .iter()
            .any(|p| ibex_wire::is_flush_marker(p, key))
    }

    /// True when `marker` is the flush marker of `entry`'s slot
    /// ([`ibex_wire::flush_marker_for`]) under the prefix `entry` is in: the
    /// one marker the filter sends beside that entry.
    fn is_marker_of(&self, entry: &[u8], marker: &[u8]) -> bool {
        let Ok(entry) = std::str::from_utf8(entry) else {
            return false;
        };
        [self.key_prefix.as_str(), ibex_wire::AGENT_KEY_PREFIX]
            .iter()
            .filter(|p| entry.starts_with(*p))
            .any(|p| ibex_wire::flush_marker_for(p, entry).as_bytes() == marker)
    }

    fn check_filter_key(&self, key: &[u8]) -> Result<(), Refusal> {
        if self.role == Role::Filter && !self.in_filter_scope(key) {
            return Err(Refusal::Forbidden(FORBIDDEN_KEY));
        }
        Ok(())
    }
}

/// How much one request may carry. Counted while the body is read, so a
/// refusal (400) comes as soon as a cap is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Commands in one `/pipeline`.
    pub max_pipeline_commands: usize,
    /// Elements of one command, its name included.
    pub max_command_args: usize,
    /// Elements of all of a request's commands together.
    pub max_request_args: usize,
}

/// Default of `--max-pipeline-commands`.
pub const DEFAULT_MAX_PIPELINE_COMMANDS: usize = 1000;
/// Default of `--max-command-args`.
pub const DEFAULT_MAX_COMMAND_ARGS: usize = 1024;
/// Default of `--max-request-args`.
pub const DEFAULT_MAX_REQUEST_ARGS: usize = 16 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pipeline_commands: DEFAULT_MAX_PIPELINE_COMMANDS,
            max_command_args: DEFAULT_MAX_COMMAND_ARGS,
            max_request_args: DEFAULT_MAX_REQUEST_ARGS,
        }
    }
}

/// A checked command, ready for Redis: the verb and its arguments (after the
/// name), numbers in canonical decimal. Its `Debug` shows the verb and the
/// number of arguments only.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    verb: Verb,
    args: Vec<Vec<u8>>,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("verb", &self.verb)
            .field("args", &self.args.len())
            .finish()
    }
}

impl Command {
    /// The command's verb.
    pub fn verb(&self) -> Verb {
        self.verb
    }

    /// The arguments after the command name, as Redis will receive them.
    pub fn args(&self) -> &[Vec<u8>] {
        &self.args
    }
}

/// Redis's own wording, so an SDK user sees what a Redis server would say.
fn wrong_arity(verb: Verb) -> Refusal {
    Refusal::bad(format!(
        "ERR wrong number of arguments for '{}' command",
        verb.label()
    ))
}

const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX_ERROR: &str = "ERR syntax error";

/// Longest TTL a write may carry, in seconds (a year: the filter's own bound on
/// `cache.ttl_seconds`).
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// Refusal of a command outside the allowlist.
pub const FORBIDDEN_COMMAND: &str =
    "ERR command not allowed: this REST front runs only GET, SET, DEL, EVAL and PING";
/// Refusal of an `EVAL` script that is not one of the filter's.
pub const FORBIDDEN_SCRIPT: &str = "ERR script not allowed: this REST front runs only the \
     ibex-directive filter's scripts";
/// Refusal of an allowlisted command the filter's token may not run.
pub const FORBIDDEN_FOR_FILTER: &str = "ERR command not allowed for this token: the filter's \
     token runs only PING, GET and EVAL of the filter's scripts";
/// Refusal of a key outside the filter token's scope (the key is not named).
pub const FORBIDDEN_KEY: &str = "ERR key not allowed for this token: the filter's token \
     reaches only the filter's keys (its key prefix and agent_key:)";
/// Refusal of the write script aimed at a flush marker with the filter's token.
pub const FORBIDDEN_MARKER_WRITE: &str = "ERR key not allowed for this token: the filter \
     never writes a flush marker";
/// Refusal of the write script whose second key is not its entry's flush
/// marker, with the filter's token (another key would let it write past a flush).
pub const FORBIDDEN_MARKER_MISMATCH: &str = "ERR key not allowed for this token: the write \
     script's second key must be the flush marker of its entry's slot";
/// Refusal of a `SET` without `EX`.
pub const SET_NEEDS_EX: &str =
    "ERR SET needs EX seconds here (1 to 31536000): every key is written with a TTL";
/// Refusal of the write script with a TTL (`ARGV[1]`) out of range.
pub const WRITE_TTL_RANGE: &str = "ERR invalid expire time in 'eval' command: the write \
     script's TTL (ARGV[1]) must be 1 to 31536000 seconds";

/// A non-negative decimal integer as Redis reads it: ASCII digits only, no sign,
/// no spaces, no leading `+`. `None` for anything else or above `i64::MAX`.
fn parse_decimal(arg: &[u8]) -> Option<u64> {
    if arg.is_empty() || arg.len() > 19 || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(arg).ok()?.parse::<u64>().ok()?;
    (n <= i64::MAX as u64).then_some(n)
}

/// Checks a full argument list (command name first) against the allowlist, the
/// token's [`Role`] and each command's grammar, in that order: a command the
/// token may not run is a 403 however malformed it is.
pub fn parse(mut parts: Vec<Vec<u8>>, policy: &Policy) -> Result<Command, Refusal> {
    if parts.is_empty() {
        return Err(Refusal::bad("ERR empty command"));
    }
    let args = parts.split_off(1);
    let name = parts.swap_remove(0);
    if std::str::from_utf8(&name).is_err() {
        return Err(Refusal::bad("ERR command name must be UTF-8 text"));
    }
    let verb = Verb::from_name(&name).ok_or(Refusal::Forbidden(FORBIDDEN_COMMAND))?;
    if policy.role == Role::Filter && !matches!(verb, Verb::Get | Verb::Eval | Verb::Ping) {
        return Err(Refusal::Forbidden(FORBIDDEN_FOR_FILTER));
    }
    let args = match verb {
        Verb::Get => {
            let [key] = args.as_slice() else {
                return Err(wrong_arity(verb));
            };
            policy.check_filter_key(key)?;
            args
        }
        Verb::Del => {
            if args.is_empty() {
                return Err(wrong_arity(verb));
            }
            args
        }
        Verb::Ping => {
            if args.len() > 1 {
                return Err(wrong_arity(verb));
            }
            args
        }
        Verb::Set => parse_set(args)?,
        Verb::Eval => parse_eval(args, policy)?,
    };
    Ok(Command { verb, args })
}

/// A TTL as the front takes it: canonical decimal 1..=[`MAX_TTL_SECONDS`].
fn ttl_in_range(arg: &[u8]) -> Option<u64> {
    parse_decimal(arg).filter(|n| (1..=MAX_TTL_SECONDS).contains(n))
}

/// `SET key value EX n [NX]`, the options in any order, each once; `EX` is
/// required (SPEC §4: every key is written with a TTL) and at most a year.
/// Re-spelled as `SET key value EX n [NX]` with `n` canonical.
fn parse_set(args: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Refusal> {
    if args.len() < 2 {
        return Err(wrong_arity(Verb::Set));
    }
    let mut it = args.into_iter();
    let (Some(key), Some(value)) = (it.next(), it.next()) else {
        return Err(wrong_arity(Verb::Set));
    };
    let mut ex: Option<u64> = None;
    let mut nx = false;
    while let Some(opt) = it.next() {
        if opt.eq_ignore_ascii_case(b"EX") && ex.is_none() {
            let raw = it.next().ok_or_else(|| Refusal::bad(SYNTAX_ERROR))?;
            let n = parse_decimal(&raw).ok_or_else(|| Refusal::bad(NOT_AN_INTEGER))?;
            if !(1..=MAX_TTL_SECONDS).contains(&n) {
                return Err(Refusal::bad("ERR invalid expire time in 'set' command"));
            }
            ex = Some(n);
        } else if opt.eq_ignore_ascii_case(b"NX") && !nx {
            nx = true;
        } else {
            // Another option (PX, XX, GET, KEEPTTL…), or one given twice.
            return Err(Refusal::bad(SYNTAX_ERROR));
        }
    }
    let Some(n) = ex else {
        return Err(Refusal::bad(SET_NEEDS_EX));
    };
    let mut out = vec![key, value, b"EX".to_vec(), n.to_string().into_bytes()];
    if nx {
        out.push(b"NX".to_vec());
    }
    Ok(out)
}

/// `EVAL script numkeys key… arg…`: the script must be one of the filter's
/// (unless the admin token and `allow_any_script`), `numkeys` must fit the
/// arguments, the filter's token must name only its own keys, and the write
/// script's TTL must be in range whoever sends it.
fn parse_eval(mut args: Vec<Vec<u8>>, policy: &Policy) -> Result<Vec<Vec<u8>>, Refusal> {
    if args.len() < 2 {
        return Err(wrong_arity(Verb::Eval));
    }
    let script = &args[0];
    let any_script = policy.allow_any_script && policy.role == Role::Admin;
    if !any_script
        && !ibex_wire::FILTER_SCRIPTS
            .iter()
            .any(|s| s.as_bytes() == script.as_slice())
    {
        return Err(Refusal::Forbidden(FORBIDDEN_SCRIPT));
    }
    let is_write = script.as_slice() == ibex_wire::SET_IF_ABSENT_SCRIPT.as_bytes();
    let numkeys = parse_decimal(&args[1]).ok_or_else(|| {
        if args[1].first() == Some(&b'-') {
            Refusal::bad("ERR Number of keys can't be negative")
        } else {
            Refusal::bad(NOT_AN_INTEGER)
        }
    })?;
    let rest = &args[2..];
    let Some((keys, argv)) = usize::try_from(numkeys)
        .ok()
        .and_then(|n| (n <= rest.len()).then(|| rest.split_at(n)))
    else {
        return Err(Refusal::bad(
            "ERR Number of keys can't be greater than number of args",
        ));
    };
    if policy.role == Role::Filter {
        for key in keys {
            policy.check_filter_key(key)?;
        }
        // The write script sets KEYS[1]: the filter's entries, never a marker
        // (a marker set for a year would keep every write-back out of Redis).
        if is_write && keys.first().is_some_and(|k| policy.is_flush_marker(k)) {
            return Err(Refusal::Forbidden(FORBIDDEN_MARKER_WRITE));
        }
        // ... and checks the marker of that entry's slot, nothing else: the one
        // the subscriber sets on a flush, and in the entry's Redis Cluster slot.
        if is_write {
            match keys {
                [entry, marker] if policy.is_marker_of(entry, marker) => {}
                _ => return Err(Refusal::Forbidden(FORBIDDEN_MARKER_MISMATCH)),
            }
        }
    }
    if is_write {
        let ttl = argv.first().and_then(|a| ttl_in_range(a));
        let Some(ttl) = ttl else {
            return Err(Refusal::bad(WRITE_TTL_RANGE));
        };
        let at = 2 + keys.len();
        args[at] = ttl.to_string().into_bytes();
    }
    args[1] = numkeys.to_string().into_bytes();
    Ok(args)
}

// ------------------------------------------------------------------ JSON forms

/// One element of a JSON command: a string (its UTF-8 bytes) or an integer (its
/// decimal text). Anything else fails deserialisation.
struct Arg(Vec<u8>);

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ArgVisitor;
        impl Visitor<'_> for ArgVisitor {
            type Value = Arg;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Arg, E> {
                Ok(Arg(v.as_bytes().to_vec()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Arg, E> {
                Ok(Arg(v.into_bytes()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Arg, E> {
                Ok(Arg(v.to_string().into_bytes()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Arg, E> {
                Ok(Arg(v.to_string().into_bytes()))
            }
        }
        d.deserialize_any(ArgVisitor)
    }
}

/// What one request has used of its [`Limits`] so far, and the refusal of the
/// cap it passed, if any (serde's error carries no value of ours, so the reason
/// waits here while the error unwinds the parser).
struct Budget {
    limits: Limits,
    args: Cell<usize>,
    over: Cell<Option<Refusal>>,
}

impl Budget {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            args: Cell::new(0),
            over: Cell::new(None),
        }
    }

    /// Stops the parser: records why and returns the error that unwinds it.
    fn exceeded<E: de::Error>(&self, why: String) -> E {
        self.over.set(Some(Refusal::BadRequest(why)));
        E::custom("limit")
    }

    /// Counts one more element of a command that holds `in_command` already.
    fn count_arg<E: de::Error>(&self, in_command: usize) -> Result<(), E> {
        if in_command >= self.limits.max_command_args {
            return Err(self.exceeded(too_many_command_args(self.limits.max_command_args)));
        }
        let total = self.args.get().saturating_add(1);
        if total > self.limits.max_request_args {
            return Err(self.exceeded(format!(
                "ERR request has more than {} arguments in all",
                self.limits.max_request_args
            )));
        }
        self.args.set(total);
        Ok(())
    }

    /// The refusal for a parser failure: a passed cap if one was, else the
    /// fixed text for `e`.
    fn refusal(&self, e: &serde_json::Error, shape: &'static str) -> Refusal {
        self.over.take().unwrap_or_else(|| json_refusal(e, shape))
    }
}

fn too_many_command_args(max: usize) -> String {
    format!("ERR command has more than {max} arguments")
}

/// Reads one JSON command (an array of [`Arg`]) against a [`Budget`]. No
/// capacity is reserved ahead: a command grows only by what was read.
struct CommandSeed<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for CommandSeed<'_> {
    type Value = Vec<Vec<u8>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CommandSeed<'_> {
    type Value = Vec<Vec<u8>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of strings and integers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Arg(a)) = seq.next_element()? {
            self.0.count_arg(out.len())?;
            out.push(a);
        }
        Ok(out)
    }
}

/// Reads a JSON pipeline (an array of commands) against a [`Budget`], refusing
/// at the first command past the cap.
struct PipelineSeed<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for PipelineSeed<'_> {
    type Value = Vec<Vec<Vec<u8>>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PipelineSeed<'_> {
    type Value = Vec<Vec<Vec<u8>>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of commands")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(cmd) = seq.next_element_seed(CommandSeed(self.0))? {
            if out.len() >= self.0.limits.max_pipeline_commands {
                return Err(self.0.exceeded(format!(
                    "ERR pipeline has more than {} commands",
                    self.0.limits.max_pipeline_commands
                )));
            }
            out.push(cmd);
        }
        Ok(out)
    }
}

/// Runs `seed` over the whole of `body` (trailing bytes other than whitespace
/// are an error, as in `serde_json::from_slice`).
fn read_json<'de, S: DeserializeSeed<'de>>(
    body: &'de [u8],
    seed: S,
    budget: &Budget,
    shape: &'static str,
) -> Result<S::Value, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    seed.deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| budget.refusal(&e, shape))
}

/// Maps a serde_json failure to a fixed message: its own text can quote the
/// input (`invalid type: string "…"`), which may be directive text.
fn json_refusal(e: &serde_json::Error, shape: &'static str) -> Refusal {
    match e.classify() {
        serde_json::error::Category::Data => Refusal::bad(shape),
        _ => Refusal::bad("ERR request body is not valid JSON"),
    }
}

const COMMAND_SHAPE: &str =
    "ERR request body must be a JSON array of strings and integers: [\"COMMAND\", \"arg\", …]";
const PIPELINE_SHAPE: &str =
    "ERR pipeline body must be a JSON array of commands: [[\"COMMAND\", \"arg\", …], …]";

/// The body of `POST /`: one command as a JSON array, within `limits`. Not
/// checked against the allowlist yet (see [`parse`]).
pub fn json_command(body: &[u8], limits: Limits) -> Result<Vec<Vec<u8>>, Refusal> {
    let budget = Budget::new(limits);
    read_json(body, CommandSeed(&budget), &budget, COMMAND_SHAPE)
}

/// The body of `POST /pipeline`: a JSON array of commands, at least one, within
/// `limits`; each command is checked later (see [`parse`]).
pub fn json_pipeline(body: &[u8], limits: Limits) -> Result<Vec<Vec<Vec<u8>>>, Refusal> {
    let budget = Budget::new(limits);
    let cmds = read_json(body, PipelineSeed(&budget), &budget, PIPELINE_SHAPE)?;
    if cmds.is_empty() {
        return Err(Refusal::bad("ERR empty pipeline"));
    }
    Ok(cmds)
}

/// A whole pipeline checked: every command allowed and well formed, or the
/// first refusal, with forbidden commands winning over malformed ones (a
/// pipeline that would run anything outside the token's allowlist is a 403
/// whatever else is wrong with it).
pub fn parse_pipeline(cmds: Vec<Vec<Vec<u8>>>, policy: &Policy) -> Result<Vec<Command>, Refusal> {
    // Sized by commands already read (and capped), not by anything declared.
    let mut out = Vec::with_capacity(cmds.len());
    let mut first_bad = None;
    for parts in cmds {
        match parse(parts, policy) {
            Ok(c) => out.push(c),
            Err(r @ Refusal::Forbidden(_)) => return Err(r),
            Err(r) => {
                first_bad.get_or_insert(r);
            }
        }
    }
    match first_bad {
        Some(r) => Err(r),
        None => Ok(out),
    }
}

// ------------------------------------------------------------------ path form

/// Decodes `%XX` escapes to bytes (the result need not be UTF-8). `+` stays a
/// plus: RFC 3986 percent-encoding, not HTML form encoding, so a token or value
/// with `+` in it arrives as written. `None` for a `%` not followed by two hex
/// digits.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16))?;
            let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16))?;
            out.push(((hi << 4) | lo) as u8);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// Name of the query parameter that may carry the token instead of the
/// `Authorization` header; it is never an argument.
pub const TOKEN_PARAM: &str = "_token";

/// One query parameter, percent-decoded: its name and, unless it is a bare
/// `name` without `=`, its value.
pub type QueryPair = (Vec<u8>, Option<Vec<u8>>);

/// The query parameters of a path-form request, in order, `_token` included.
pub fn query_pairs(query: &str) -> Result<Vec<QueryPair>, Refusal> {
    let bad = || Refusal::bad("ERR malformed percent-encoding in the query");
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((
                percent_decode(k).ok_or_else(bad)?,
                Some(percent_decode(v).ok_or_else(bad)?),
            )),
            None => Ok((percent_decode(p).ok_or_else(bad)?, None)),
        })
        .collect()
}

/// The arguments of a path-form request `/{command}/{arg}/…`: the
/// percent-decoded segments (empty ones included: `/set/k/` sets `k` to ""),
/// then `body` as one argument when it is not empty, byte for byte, then every
/// query parameter except `_token` as `name` followed by `value` (Upstash's
/// `POST /set/foo?EX=100` with a body is `SET foo <body> EX 100`). Refused as
/// soon as there are more than `limits` allow for one command.
pub fn path_args(
    path: &str,
    body: &[u8],
    query: Option<&str>,
    limits: Limits,
) -> Result<Vec<Vec<u8>>, Refusal> {
    let max = limits.max_command_args.min(limits.max_request_args);
    let mut args = Vec::new();
    let push = |args: &mut Vec<Vec<u8>>, a: Vec<u8>| {
        if args.len() >= max {
            return Err(Refusal::bad(too_many_command_args(max)));
        }
        args.push(a);
        Ok(())
    };
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    for seg in trimmed.split('/') {
        if args.len() >= max {
            return Err(Refusal::bad(too_many_command_args(max)));
        }
        let a = percent_decode(seg)
            .ok_or_else(|| Refusal::bad("ERR malformed percent-encoding in the path"))?;
        push(&mut args, a)?;
    }
    if !body.is_empty() {
        push(&mut args, body.to_vec())?;
    }
    if let Some(q) = query {
        for (name, value) in query_pairs(q)? {
            if name == TOKEN_PARAM.as_bytes() {
                continue;
            }
            push(&mut args, name)?;
            if let Some(v) = value {
                push(&mut args, v)?;
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn admin() -> Policy {
        Policy::admin(ibex_wire::DEFAULT_KEY_PREFIX, false)
    }

    fn filter() -> Policy {
        Policy::filter(ibex_wire::DEFAULT_KEY_PREFIX)
    }

    fn ok_as(policy: &Policy, parts: &[&str]) -> Command {
        parse(v(parts), policy).unwrap_or_else(|r| panic!("{parts:?}: {r:?}"))
    }

    fn bad_as(policy: &Policy, parts: &[&str]) -> String {
        match parse(v(parts), policy) {
            Err(Refusal::BadRequest(m)) => m,
            other => panic!("expected 400 for {parts:?}, got {other:?}"),
        }
    }

    fn forbidden_as(policy: &Policy, parts: &[&str]) -> &'static str {
        match parse(v(parts), policy) {
            Err(Refusal::Forbidden(m)) => m,
            other => panic!("expected 403 for {parts:?}, got {other:?}"),
        }
    }

    fn ok(parts: &[&str]) -> Command {
        ok_as(&admin(), parts)
    }

    fn bad(parts: &[&str]) -> String {
        bad_as(&admin(), parts)
    }

    fn forbidden(parts: &[&str]) {
        forbidden_as(&admin(), parts);
    }

    const WRITE: &str = ibex_wire::SET_IF_ABSENT_SCRIPT;
    const ENTRY: &str = "directive:6f1c2a3b-0000-4000-8000-000000000001";
    /// The flush marker of ENTRY's slot: the one the filter sends beside it.
    static MARKER: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ibex_wire::flush_marker_for("directive:", ENTRY));

    #[test]
    fn names_are_case_insensitive_and_the_allowlist_is_closed() {
        assert_eq!(ok(&["get", "k"]).verb(), Verb::Get);
        assert_eq!(ok(&["GeT", "k"]).verb(), Verb::Get);
        assert_eq!(ok(&["PING"]).verb(), Verb::Ping);
        assert_eq!(ok(&["ping", "hi"]).args(), v(&["hi"]));
        assert_eq!(ok(&["del", "a", "b"]).args(), v(&["a", "b"]));
        for name in [
            "FLUSHALL", "flushdb", "CONFIG", "KEYS", "SCAN", "EVALSHA", "EVAL_RO", "FCALL",
            "SCRIPT", "SETEX", "INCR", "MULTI", "DEBUG", "SHUTDOWN", "getx", "",
        ] {
            forbidden(&[name, "x"]);
        }
        assert_eq!(
            parse(vec![b"\xffGET".to_vec()], &admin()),
            Err(Refusal::BadRequest(
                "ERR command name must be UTF-8 text".into()
            ))
        );
        assert!(matches!(
            parse(vec![], &admin()),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn arity() {
        assert!(bad(&["GET"]).contains("'get'"));
        bad(&["GET", "a", "b"]);
        bad(&["DEL"]);
        bad(&["PING", "a", "b"]);
        bad(&["SET", "k"]);
        bad(&["EVAL", ibex_wire::SET_IF_ABSENT_SCRIPT]);
    }

    #[test]
    fn set_options_in_any_order_each_once_and_ex_required() {
        // SPEC §4: every key is written with a TTL, whoever writes it.
        assert_eq!(bad(&["SET", "k", "v"]), SET_NEEDS_EX);
        assert_eq!(bad(&["SET", "k", "v", "NX"]), SET_NEEDS_EX);
        assert_eq!(
            ok(&["set", "k", "v", "ex", "100"]).args(),
            v(&["k", "v", "EX", "100"])
        );
        assert_eq!(
            ok(&["SET", "k", "v", "NX", "EX", "7"]).args(),
            v(&["k", "v", "EX", "7", "NX"])
        );
        assert_eq!(
            ok(&["SET", "k", "v", "EX", "007", "nx"]).args(),
            v(&["k", "v", "EX", "7", "NX"])
        );
        // The value may itself look like an option.
        assert_eq!(
            ok(&["SET", "k", "EX", "EX", "5"]).args(),
            v(&["k", "EX", "EX", "5"])
        );
        assert_eq!(bad(&["SET", "k", "v", "EX"]), SYNTAX_ERROR);
        assert!(bad(&["SET", "k", "v", "EX", "0"]).contains("expire"));
        assert_eq!(
            ok(&["SET", "k", "v", "EX", "31536000"]).args(),
            v(&["k", "v", "EX", "31536000"])
        );
        assert!(bad(&["SET", "k", "v", "EX", "31536001"]).contains("expire"));
        for n in [
            "-1",
            "+1",
            "1.5",
            " 1",
            "1 ",
            "",
            "abc",
            "99999999999999999999",
        ] {
            assert_eq!(bad(&["SET", "k", "v", "EX", n]), NOT_AN_INTEGER, "{n:?}");
        }
        assert_eq!(bad(&["SET", "k", "v", "EX", "1", "EX", "2"]), SYNTAX_ERROR);
        assert_eq!(bad(&["SET", "k", "v", "NX", "nx"]), SYNTAX_ERROR);
        for opt in ["PX", "XX", "GET", "KEEPTTL", "EXAT", "PXAT", "x"] {
            assert_eq!(bad(&["SET", "k", "v", opt, "1"]), SYNTAX_ERROR, "{opt}");
        }
    }

    #[test]
    fn eval_runs_only_the_filter_scripts_by_default() {
        let c = ok(&[
            "EVAL",
            ibex_wire::SET_IF_ABSENT_SCRIPT,
            "2",
            "k",
            "m",
            "60",
            "v",
        ]);
        assert_eq!(c.verb(), Verb::Eval);
        assert_eq!(c.args().len(), 6);
        ok(&["eval", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", "k"]);
        // Exact text only: a trailing space, another script, a FLUSHALL.
        let spaced = format!("{} ", ibex_wire::GET_WITH_PTTL_SCRIPT);
        forbidden(&["EVAL", &spaced, "1", "k"]);
        forbidden(&["EVAL", "redis.call('FLUSHALL')", "0"]);
        forbidden(&[
            "EVAL",
            "return redis.call('CONFIG','SET','dir','/tmp')",
            "0",
        ]);
        // Lifted by the flag, for the admin token only.
        let any = Policy::admin(ibex_wire::DEFAULT_KEY_PREFIX, true);
        assert!(parse(v(&["EVAL", "return 1", "0"]), &any).is_ok());
        let filter_any = Policy {
            allow_any_script: true,
            ..filter()
        };
        assert_eq!(
            forbidden_as(&filter_any, &["EVAL", "return 1", "0"]),
            FORBIDDEN_SCRIPT
        );
    }

    #[test]
    fn every_filter_script_runs_for_the_filter_token_on_its_keys() {
        let f = filter();
        let key_entry = format!("agent_key:{}", "a".repeat(64));
        for script in ibex_wire::FILTER_SCRIPTS {
            if script == WRITE {
                continue;
            }
            for key in [ENTRY, key_entry.as_str()] {
                assert_eq!(ok_as(&f, &["EVAL", script, "1", key]).verb(), Verb::Eval);
                assert_eq!(
                    forbidden_as(&f, &["EVAL", script, "1", "other:key"]),
                    FORBIDDEN_KEY
                );
            }
        }
        // The write-back exactly as the filter sends it (numbers as strings).
        let c = ok_as(
            &f,
            &["EVAL", WRITE, "2", ENTRY, MARKER.as_str(), "60", "text"],
        );
        assert_eq!(c.args()[4], b"60".to_vec());
        ok_as(
            &f,
            &[
                "EVAL",
                WRITE,
                "2",
                &key_entry,
                &ibex_wire::flush_marker_for("agent_key:", &key_entry),
                "31536000",
                "agent",
            ],
        );
        assert_eq!(ok_as(&f, &["GET", ENTRY]).verb(), Verb::Get);
        assert_eq!(ok_as(&f, &["get", &key_entry]).verb(), Verb::Get);
        assert_eq!(ok_as(&f, &["PING"]).verb(), Verb::Ping);
        // Another prefix is another scope.
        let other = Policy::filter("d:");
        ok_as(&other, &["GET", "d:x"]);
        assert_eq!(forbidden_as(&other, &["GET", ENTRY]), FORBIDDEN_KEY);
    }

    #[test]
    fn the_filter_token_runs_nothing_else() {
        let f = filter();
        for parts in [
            &["SET", ENTRY, "v", "EX", "60"][..],
            &["SET", ENTRY, "v"],
            &["SET"],
            &["DEL", ENTRY],
            &["DEL", MARKER.as_str()],
            &["del"],
        ] {
            assert_eq!(forbidden_as(&f, parts), FORBIDDEN_FOR_FILTER, "{parts:?}");
        }
        assert_eq!(forbidden_as(&f, &["FLUSHALL"]), FORBIDDEN_COMMAND);
        assert_eq!(forbidden_as(&f, &["GET", "other"]), FORBIDDEN_KEY);
        assert_eq!(forbidden_as(&f, &["GET", "directive"]), FORBIDDEN_KEY);
        assert_eq!(
            forbidden_as(&f, &["EVAL", "return 1", "0"]),
            FORBIDDEN_SCRIPT
        );
        // Every key of the script is checked, the marker's too.
        assert_eq!(
            forbidden_as(&f, &["EVAL", WRITE, "2", ENTRY, "other", "60", "v"]),
            FORBIDDEN_KEY
        );
        assert_eq!(
            forbidden_as(
                &f,
                &["EVAL", WRITE, "2", "other", MARKER.as_str(), "60", "v"]
            ),
            FORBIDDEN_KEY
        );
        // The second key is the marker of the entry's slot, no other: not the
        // old single marker, not another slot's, not the other prefix's.
        let other_entry = "directive:6f1c2a3b-0000-4000-8000-000000000002";
        let other_slot = ibex_wire::flush_marker_for("directive:", other_entry);
        assert_ne!(other_slot, *MARKER);
        for wrong in [
            "directive:__flush__",
            other_slot.as_str(),
            &ibex_wire::flush_marker_for("agent_key:", ENTRY),
            other_entry,
        ] {
            assert_eq!(
                forbidden_as(&f, &["EVAL", WRITE, "2", ENTRY, wrong, "60", "v"]),
                FORBIDDEN_MARKER_MISMATCH,
                "{wrong}"
            );
        }
        assert_eq!(
            forbidden_as(&f, &["EVAL", WRITE, "1", ENTRY, "60", "v"]),
            FORBIDDEN_MARKER_MISMATCH
        );
        // The filter never writes a marker.
        for marker in [MARKER.as_str(), "agent_key:__flush__"] {
            assert_eq!(
                forbidden_as(&f, &["EVAL", WRITE, "2", marker, ENTRY, "60", "1"]),
                FORBIDDEN_MARKER_WRITE
            );
        }
        // Arity is still checked for what it may run.
        bad_as(&f, &["GET"]);
        bad_as(&f, &["GET", ENTRY, ENTRY]);
        // No message names the key.
        let m = forbidden_as(&f, &["GET", "secret-key-7f3a"]);
        assert!(!m.contains("secret"));
    }

    #[test]
    fn the_write_script_needs_a_ttl_in_range_from_every_token() {
        for p in [filter(), admin()] {
            for ttl in ["0", "31536001", "99999999999", "-1", "1.5", "", "x", " 60"] {
                assert_eq!(
                    bad_as(&p, &["EVAL", WRITE, "2", ENTRY, MARKER.as_str(), ttl, "v"]),
                    WRITE_TTL_RANGE,
                    "{:?} {ttl:?}",
                    p.role
                );
            }
            assert_eq!(
                bad_as(&p, &["EVAL", WRITE, "2", ENTRY, MARKER.as_str()]),
                WRITE_TTL_RANGE
            );
            let c = ok_as(
                &p,
                &["EVAL", WRITE, "2", ENTRY, MARKER.as_str(), "007", "v"],
            );
            assert_eq!(c.args()[4], b"7".to_vec(), "re-spelled canonically");
            ok_as(&p, &["EVAL", WRITE, "2", ENTRY, MARKER.as_str(), "1", "v"]);
        }
        // The read scripts have no TTL.
        ok_as(
            &filter(),
            &["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", ENTRY],
        );
    }

    #[test]
    fn the_admin_token_runs_the_allowlist_on_any_key() {
        let a = admin();
        ok_as(&a, &["SET", "any:key", "v", "EX", "60"]);
        ok_as(&a, &["DEL", MARKER.as_str(), "any:key"]);
        ok_as(&a, &["GET", "any:key"]);
        ok_as(
            &a,
            &["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", "any:key"],
        );
        ok_as(
            &a,
            &["EVAL", WRITE, "2", MARKER.as_str(), "other", "60", "1"],
        );
    }

    #[test]
    fn eval_numkeys_fits_the_arguments() {
        let s = ibex_wire::GET_WITH_PTTL_SCRIPT;
        ok(&["EVAL", s, "0"]);
        ok(&["EVAL", s, "1", "k"]);
        ok(&["EVAL", s, "1", "k", "a", "b"]);
        assert!(bad(&["EVAL", s, "2", "k"]).contains("greater"));
        assert!(bad(&["EVAL", s, "-1", "k"]).contains("negative"));
        assert_eq!(bad(&["EVAL", s, "x", "k"]), NOT_AN_INTEGER);
        assert_eq!(ok(&["EVAL", s, "01", "k"]).args()[1], b"1".to_vec());
    }

    #[test]
    fn json_command_takes_strings_and_integers_only() {
        assert_eq!(
            json_command(br#"["SET", "foo", "bar", "EX", 100]"#, L).unwrap(),
            v(&["SET", "foo", "bar", "EX", "100"])
        );
        assert_eq!(json_command(b"[\"x\", -5]", L).unwrap(), v(&["x", "-5"]));
        // JSON escapes decode to the exact bytes, NUL included.
        assert_eq!(
            json_command(br#"["\u0000", "\r", "\ufffd", "\ud83d\ude00"]"#, L).unwrap(),
            vec![
                b"\0".to_vec(),
                b"\r".to_vec(),
                "\u{fffd}".as_bytes().to_vec(),
                "😀".as_bytes().to_vec()
            ]
        );
        assert_eq!(json_command(b"[]", L).unwrap(), Vec::<Vec<u8>>::new());
        for body in [
            &b"[1.5]"[..],
            b"[true]",
            b"[null]",
            b"[[\"a\"]]",
            b"[{\"a\":1}]",
            b"{\"a\":1}",
            b"\"GET\"",
            b"1e3",
        ] {
            assert_eq!(
                json_command(body, L),
                Err(Refusal::BadRequest(COMMAND_SHAPE.into())),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [&b""[..], b"[", b"[\"a\",]", b"\xff", b"[\"\\ud800\"]"] {
            assert_eq!(
                json_command(body, L),
                Err(Refusal::BadRequest(
                    "ERR request body is not valid JSON".into()
                )),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn json_refusals_never_quote_the_input() {
        let secret = "PRIVATE-MARKER-1234";
        let body = format!(r#"[{{"{secret}": "{secret}"}}]"#);
        let Err(Refusal::BadRequest(m)) = json_command(body.as_bytes(), L) else {
            panic!()
        };
        assert!(!m.contains(secret));
        let body = format!(r#"[["GET", "{secret}"], "{secret}"]"#);
        let Err(Refusal::BadRequest(m)) = json_pipeline(body.as_bytes(), L) else {
            panic!()
        };
        assert!(!m.contains(secret));
    }

    #[test]
    fn pipelines() {
        let cmds = json_pipeline(br#"[["SET","k","v","EX",1],["GET","k"]]"#, L).unwrap();
        assert_eq!(cmds.len(), 2);
        let parsed = parse_pipeline(cmds, &admin()).unwrap();
        assert_eq!(parsed[1].verb(), Verb::Get);
        assert!(matches!(
            json_pipeline(b"[]", L),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            json_pipeline(br#"["GET","k"]"#, L),
            Err(Refusal::BadRequest(_))
        ));
        // One forbidden command refuses the whole pipeline with 403, even after a
        // malformed one.
        let cmds = json_pipeline(br#"[["GET"],["SET","k","v"],["FLUSHALL"]]"#, L).unwrap();
        assert!(matches!(
            parse_pipeline(cmds, &admin()),
            Err(Refusal::Forbidden(_))
        ));
        let cmds = json_pipeline(br#"[["GET","k"],["GET"],[]]"#, L).unwrap();
        assert!(matches!(
            parse_pipeline(cmds, &admin()),
            Err(Refusal::BadRequest(_))
        ));
        // A command the filter's token may not run refuses its whole pipeline.
        let cmds = json_pipeline(br#"[["GET","directive:a"],["DEL","directive:a"]]"#, L).unwrap();
        assert!(matches!(
            parse_pipeline(cmds, &filter()),
            Err(Refusal::Forbidden(FORBIDDEN_FOR_FILTER))
        ));
    }

    const L: Limits = Limits {
        max_pipeline_commands: DEFAULT_MAX_PIPELINE_COMMANDS,
        max_command_args: DEFAULT_MAX_COMMAND_ARGS,
        max_request_args: DEFAULT_MAX_REQUEST_ARGS,
    };

    fn repeated(item: &str, n: usize) -> Vec<u8> {
        let mut body = b"[".to_vec();
        for i in 0..n {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item.as_bytes());
        }
        body.push(b']');
        body
    }

    #[test]
    fn caps_are_counted_while_reading() {
        let small = Limits {
            max_pipeline_commands: 3,
            max_command_args: 4,
            max_request_args: 10,
        };
        // Exactly at each cap: read.
        assert_eq!(json_pipeline(&repeated("[]", 3), small).unwrap().len(), 3);
        assert_eq!(json_command(&repeated("\"a\"", 4), small).unwrap().len(), 4);
        // One past: refused, with the cap (never the input) in the message.
        assert_eq!(
            json_pipeline(&repeated("[]", 4), small),
            Err(Refusal::bad("ERR pipeline has more than 3 commands"))
        );
        assert_eq!(
            json_command(&repeated("\"a\"", 5), small),
            Err(Refusal::bad("ERR command has more than 4 arguments"))
        );
        assert_eq!(
            json_pipeline(&repeated(r#"["a","b","c"]"#, 3), small)
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            json_pipeline(
                br#"[["a","b","c","d"],["a","b","c","d"],["a","b","c"]]"#,
                small
            ),
            Err(Refusal::bad(
                "ERR request has more than 10 arguments in all"
            ))
        );
        // The reader stops at the cap: what follows it is never parsed, so a
        // syntax error there is not what is reported.
        let mut body = repeated("[]", 4);
        body.pop();
        body.extend_from_slice(b",[\"unterminated");
        assert_eq!(
            json_pipeline(&body, small),
            Err(Refusal::bad("ERR pipeline has more than 3 commands"))
        );
        // A cap refusal is not mistaken for a shape error, and vice versa.
        assert_eq!(
            json_pipeline(br#"[["a"],"x"]"#, small),
            Err(Refusal::bad(PIPELINE_SHAPE))
        );
        // The default caps: a million empty commands are refused at the 1001st.
        let huge = repeated("[]", 1_000_000);
        assert_eq!(
            json_pipeline(&huge, L),
            Err(Refusal::bad("ERR pipeline has more than 1000 commands"))
        );
        assert_eq!(
            json_pipeline(&repeated(r#"["PING"]"#, 1000), L)
                .unwrap()
                .len(),
            1000
        );
        assert_eq!(
            json_command(&repeated("\"\"", 1025), L),
            Err(Refusal::bad("ERR command has more than 1024 arguments"))
        );
    }

    #[test]
    fn percent_decoding_is_bytewise() {
        assert_eq!(percent_decode("a%2Fb").unwrap(), b"a/b".to_vec());
        assert_eq!(percent_decode("%00").unwrap(), b"\0".to_vec());
        assert_eq!(percent_decode("%ff%FE").unwrap(), b"\xff\xfe".to_vec());
        assert_eq!(percent_decode("a+b").unwrap(), b"a+b".to_vec());
        assert_eq!(
            percent_decode("%F0%9F%98%80").unwrap(),
            "😀".as_bytes().to_vec()
        );
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
    }

    #[test]
    fn path_form_segments_body_then_query() {
        assert_eq!(
            path_args("/set/foo/bar", b"", None, L).unwrap(),
            v(&["set", "foo", "bar"])
        );
        assert_eq!(
            path_args("/set/foo/bar/EX/100", b"", None, L).unwrap(),
            v(&["set", "foo", "bar", "EX", "100"])
        );
        // Upstash: POST /set/foo?EX=100 with a body ≡ /set/foo/$VALUE/EX/100.
        assert_eq!(
            path_args("/set/foo", b"{\"a\": 1}\r\n", Some("EX=100"), L).unwrap(),
            vec![
                b"set".to_vec(),
                b"foo".to_vec(),
                b"{\"a\": 1}\r\n".to_vec(),
                b"EX".to_vec(),
                b"100".to_vec()
            ]
        );
        // The token parameter is never an argument, wherever it is.
        assert_eq!(
            path_args("/get/k", b"", Some("_token=s3cret&NX"), L).unwrap(),
            v(&["get", "k", "NX"])
        );
        assert_eq!(
            path_args("/get/a%2Fb%00", b"", None, L).unwrap(),
            vec![b"get".to_vec(), b"a/b\0".to_vec()]
        );
        assert_eq!(
            path_args("/set/k/", b"", None, L).unwrap(),
            v(&["set", "k", ""])
        );
        assert!(path_args("/get/%zz", b"", None, L).is_err());
        assert!(path_args("/get/k", b"", Some("a=%g0"), L).is_err());
        // The argument cap covers segments, body and query alike.
        let small = Limits {
            max_command_args: 3,
            ..L
        };
        assert_eq!(path_args("/del/a/b", b"", None, small).unwrap().len(), 3);
        let over = Err(Refusal::bad("ERR command has more than 3 arguments"));
        assert_eq!(path_args("/del/a/b/c", b"", None, small), over);
        assert_eq!(path_args("/del/a/b", b"x", None, small), over);
        assert_eq!(path_args("/del/a", b"", Some("b=c"), small), over);
        let long = format!("/del{}", "/a".repeat(100_000));
        assert_eq!(
            path_args(&long, b"", None, L),
            Err(Refusal::bad("ERR command has more than 1024 arguments"))
        );
    }

    #[test]
    fn command_debug_shows_no_argument() {
        let c = ok(&["SET", "k", "PRIVATE-MARKER", "EX", "1"]);
        let d = format!("{c:?}");
        assert!(!d.contains("PRIVATE"), "{d}");
        assert!(d.contains("Set"), "{d}");
    }
}
