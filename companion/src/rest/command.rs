//! The REST front's request language, pure: how a request's bytes become one
//! Redis command (or a pipeline of them), and which commands may run at all.
//!
//! Three request forms carry a command, as Upstash documents them: a JSON array
//! body (`["SET","k","v","EX",100]`), a JSON array of such arrays for
//! `/pipeline`, and the path form `/set/k/v?EX=100` (percent-decoded segments, then
//! a POST body as one more argument, then query parameters as `name`, `value`
//! pairs). Every form yields the same argument list, which [`parse`] checks
//! against the allowlist: `GET`, `SET` (`EX`, `NX`), `DEL`, `EVAL` of the filter's
//! scripts, `PING`. Anything else is refused here, so Redis never sees it.
//!
//! What it must never do: put an argument into a message (arguments are
//! directive text, keys and tokens; every message here is fixed or names the
//! command only), touch the network, or accept an argument shape Redis would
//! read differently from what was checked (numbers are re-spelled canonically).

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
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

/// What [`parse`] lets through.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Run any `EVAL` script, not only [`ibex_wire::FILTER_SCRIPTS`].
    pub allow_any_script: bool,
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

/// Refusal of a command outside the allowlist.
pub const FORBIDDEN_COMMAND: &str =
    "ERR command not allowed: this REST front runs only GET, SET, DEL, EVAL and PING";
/// Refusal of an `EVAL` script that is not one of the filter's.
pub const FORBIDDEN_SCRIPT: &str = "ERR script not allowed: this REST front runs only the \
     ibex-directive filter's scripts";

/// A non-negative decimal integer as Redis reads it: ASCII digits only, no sign,
/// no spaces, no leading `+`. `None` for anything else or above `i64::MAX`.
fn parse_decimal(arg: &[u8]) -> Option<u64> {
    if arg.is_empty() || arg.len() > 19 || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(arg).ok()?.parse::<u64>().ok()?;
    (n <= i64::MAX as u64).then_some(n)
}

/// Checks a full argument list (command name first) against the allowlist and
/// each command's grammar.
pub fn parse(mut parts: Vec<Vec<u8>>, policy: Policy) -> Result<Command, Refusal> {
    if parts.is_empty() {
        return Err(Refusal::bad("ERR empty command"));
    }
    let args = parts.split_off(1);
    let name = parts.swap_remove(0);
    if std::str::from_utf8(&name).is_err() {
        return Err(Refusal::bad("ERR command name must be UTF-8 text"));
    }
    let verb = Verb::from_name(&name).ok_or(Refusal::Forbidden(FORBIDDEN_COMMAND))?;
    let args = match verb {
        Verb::Get => {
            if args.len() != 1 {
                return Err(wrong_arity(verb));
            }
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

/// `SET key value` then `EX n` and `NX`, each at most once, in any order.
/// Re-spelled as `SET key value [EX n] [NX]` with `n` canonical.
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
            if n == 0 {
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
    let mut out = vec![key, value];
    if let Some(n) = ex {
        out.push(b"EX".to_vec());
        out.push(n.to_string().into_bytes());
    }
    if nx {
        out.push(b"NX".to_vec());
    }
    Ok(out)
}

/// `EVAL script numkeys key… arg…`: the script must be one of the filter's
/// (unless `allow_any_script`), and `numkeys` must fit the arguments.
fn parse_eval(mut args: Vec<Vec<u8>>, policy: Policy) -> Result<Vec<Vec<u8>>, Refusal> {
    if args.len() < 2 {
        return Err(wrong_arity(Verb::Eval));
    }
    let script = &args[0];
    if !policy.allow_any_script
        && !ibex_wire::FILTER_SCRIPTS
            .iter()
            .any(|s| s.as_bytes() == script.as_slice())
    {
        return Err(Refusal::Forbidden(FORBIDDEN_SCRIPT));
    }
    let numkeys = parse_decimal(&args[1]).ok_or_else(|| {
        if args[1].first() == Some(&b'-') {
            Refusal::bad("ERR Number of keys can't be negative")
        } else {
            Refusal::bad(NOT_AN_INTEGER)
        }
    })?;
    let rest = (args.len() - 2) as u64;
    if numkeys > rest {
        return Err(Refusal::bad(
            "ERR Number of keys can't be greater than number of args",
        ));
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

/// A JSON command: an array of [`Arg`].
struct JsonCommand(Vec<Vec<u8>>);

impl<'de> Deserialize<'de> for JsonCommand {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CmdVisitor;
        impl<'de> Visitor<'de> for CmdVisitor {
            type Value = JsonCommand;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings and integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonCommand, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(64));
                while let Some(Arg(a)) = seq.next_element()? {
                    out.push(a);
                }
                Ok(JsonCommand(out))
            }
        }
        d.deserialize_seq(CmdVisitor)
    }
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

/// The body of `POST /`: one command as a JSON array. Not checked against the
/// allowlist yet (see [`parse`]).
pub fn json_command(body: &[u8]) -> Result<Vec<Vec<u8>>, Refusal> {
    serde_json::from_slice::<JsonCommand>(body)
        .map(|c| c.0)
        .map_err(|e| json_refusal(&e, COMMAND_SHAPE))
}

/// The body of `POST /pipeline`: a JSON array of commands, at least one; each
/// command is checked later (see [`parse`]).
pub fn json_pipeline(body: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, Refusal> {
    let cmds = serde_json::from_slice::<Vec<JsonCommand>>(body)
        .map_err(|e| json_refusal(&e, PIPELINE_SHAPE))?;
    if cmds.is_empty() {
        return Err(Refusal::bad("ERR empty pipeline"));
    }
    Ok(cmds.into_iter().map(|c| c.0).collect())
}

/// A whole pipeline checked: every command allowed and well formed, or the
/// first refusal, with forbidden commands winning over malformed ones (a
/// pipeline that would run anything outside the allowlist is a 403 whatever
/// else is wrong with it).
pub fn parse_pipeline(cmds: Vec<Vec<Vec<u8>>>, policy: Policy) -> Result<Vec<Command>, Refusal> {
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
/// `POST /set/foo?EX=100` with a body is `SET foo <body> EX 100`).
pub fn path_args(path: &str, body: &[u8], query: Option<&str>) -> Result<Vec<Vec<u8>>, Refusal> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let mut args = trimmed
        .split('/')
        .map(|seg| {
            percent_decode(seg)
                .ok_or_else(|| Refusal::bad("ERR malformed percent-encoding in the path"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !body.is_empty() {
        args.push(body.to_vec());
    }
    if let Some(q) = query {
        for (name, value) in query_pairs(q)? {
            if name == TOKEN_PARAM.as_bytes() {
                continue;
            }
            args.push(name);
            if let Some(v) = value {
                args.push(v);
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

    fn ok(parts: &[&str]) -> Command {
        parse(v(parts), Policy::default()).unwrap()
    }

    fn bad(parts: &[&str]) -> String {
        match parse(v(parts), Policy::default()) {
            Err(Refusal::BadRequest(m)) => m,
            other => panic!("expected 400 for {parts:?}, got {other:?}"),
        }
    }

    fn forbidden(parts: &[&str]) {
        assert!(
            matches!(
                parse(v(parts), Policy::default()),
                Err(Refusal::Forbidden(_))
            ),
            "{parts:?}"
        );
    }

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
            parse(vec![b"\xffGET".to_vec()], Policy::default()),
            Err(Refusal::BadRequest(
                "ERR command name must be UTF-8 text".into()
            ))
        );
        assert!(matches!(
            parse(vec![], Policy::default()),
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
    fn set_options_in_any_order_each_once() {
        assert_eq!(ok(&["SET", "k", "v"]).args(), v(&["k", "v"]));
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
        assert_eq!(ok(&["SET", "k", "EX"]).args(), v(&["k", "EX"]));
        assert_eq!(bad(&["SET", "k", "v", "EX"]), SYNTAX_ERROR);
        assert!(bad(&["SET", "k", "v", "EX", "0"]).contains("expire"));
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
        // Lifted by the flag.
        let any = Policy {
            allow_any_script: true,
        };
        assert!(parse(v(&["EVAL", "return 1", "0"]), any).is_ok());
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
            json_command(br#"["SET", "foo", "bar", "EX", 100]"#).unwrap(),
            v(&["SET", "foo", "bar", "EX", "100"])
        );
        assert_eq!(json_command(b"[\"x\", -5]").unwrap(), v(&["x", "-5"]));
        // JSON escapes decode to the exact bytes, NUL included.
        assert_eq!(
            json_command(br#"["\u0000", "\r", "\ufffd", "\ud83d\ude00"]"#).unwrap(),
            vec![
                b"\0".to_vec(),
                b"\r".to_vec(),
                "\u{fffd}".as_bytes().to_vec(),
                "😀".as_bytes().to_vec()
            ]
        );
        assert_eq!(json_command(b"[]").unwrap(), Vec::<Vec<u8>>::new());
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
                json_command(body),
                Err(Refusal::BadRequest(COMMAND_SHAPE.into())),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [&b""[..], b"[", b"[\"a\",]", b"\xff", b"[\"\\ud800\"]"] {
            assert_eq!(
                json_command(body),
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
        let Err(Refusal::BadRequest(m)) = json_command(body.as_bytes()) else {
            panic!()
        };
        assert!(!m.contains(secret));
        let body = format!(r#"[["GET", "{secret}"], "{secret}"]"#);
        let Err(Refusal::BadRequest(m)) = json_pipeline(body.as_bytes()) else {
            panic!()
        };
        assert!(!m.contains(secret));
    }

    #[test]
    fn pipelines() {
        let cmds = json_pipeline(br#"[["SET","k","v"],["GET","k"]]"#).unwrap();
        assert_eq!(cmds.len(), 2);
        let parsed = parse_pipeline(cmds, Policy::default()).unwrap();
        assert_eq!(parsed[1].verb(), Verb::Get);
        assert!(matches!(json_pipeline(b"[]"), Err(Refusal::BadRequest(_))));
        assert!(matches!(
            json_pipeline(br#"["GET","k"]"#),
            Err(Refusal::BadRequest(_))
        ));
        // One forbidden command refuses the whole pipeline with 403, even after a
        // malformed one.
        let cmds = json_pipeline(br#"[["GET"],["SET","k","v"],["FLUSHALL"]]"#).unwrap();
        assert!(matches!(
            parse_pipeline(cmds, Policy::default()),
            Err(Refusal::Forbidden(_))
        ));
        let cmds = json_pipeline(br#"[["GET","k"],["GET"],[]]"#).unwrap();
        assert!(matches!(
            parse_pipeline(cmds, Policy::default()),
            Err(Refusal::BadRequest(_))
        ));
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
            path_args("/set/foo/bar", b"", None).unwrap(),
            v(&["set", "foo", "bar"])
        );
        assert_eq!(
            path_args("/set/foo/bar/EX/100", b"", None).unwrap(),
            v(&["set", "foo", "bar", "EX", "100"])
        );
        // Upstash: POST /set/foo?EX=100 with a body ≡ /set/foo/$VALUE/EX/100.
        assert_eq!(
            path_args("/set/foo", b"{\"a\": 1}\r\n", Some("EX=100")).unwrap(),
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
            path_args("/get/k", b"", Some("_token=s3cret&NX")).unwrap(),
            v(&["get", "k", "NX"])
        );
        assert_eq!(
            path_args("/get/a%2Fb%00", b"", None).unwrap(),
            vec![b"get".to_vec(), b"a/b\0".to_vec()]
        );
        assert_eq!(
            path_args("/set/k/", b"", None).unwrap(),
            v(&["set", "k", ""])
        );
        assert!(path_args("/get/%zz", b"", None).is_err());
        assert!(path_args("/get/k", b"", Some("a=%g0")).is_err());
    }

    #[test]
    fn command_debug_shows_no_argument() {
        let c = ok(&["SET", "k", "PRIVATE-MARKER"]);
        let d = format!("{c:?}");
        assert!(!d.contains("PRIVATE"), "{d}");
        assert!(d.contains("Set"), "{d}");
    }
}
