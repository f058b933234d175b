//! [`Redacted`]: a value that must never reach a log — directive text, bearer
//! tokens, URLs with passwords — so that `{:?}` of any struct holding one is safe.
//!
//! Its `Debug` prints only the length (`<redacted 17 bytes>`); it has no `Display`,
//! so it cannot be formatted into a message by accident; the only way to the value
//! is the explicit [`Redacted::expose`] (or [`Redacted::into_inner`]), which a
//! reviewer can grep for.

use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

/// A value whose `Debug` shows its length, never its content. No `Display`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Redacted<T>(T);

impl<T> Redacted<T> {
    /// Wraps a secret.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself. Send it where it is needed (a header, a body, a
    /// database), never to a logger.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// Unwraps the secret, for a caller that takes ownership of it.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> From<T> for Redacted<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl From<&str> for Redacted<String> {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl<T: SecretLen> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.secret_len())
    }
}

/// Values a [`Redacted`] can hold and describe: only their length in bytes is ever
/// shown.
pub trait SecretLen {
    /// Length in bytes; safe to log.
    fn secret_len(&self) -> usize;
}

impl SecretLen for str {
    fn secret_len(&self) -> usize {
        self.len()
    }
}

impl SecretLen for [u8] {
    fn secret_len(&self) -> usize {
        self.len()
    }
}

impl SecretLen for String {
    fn secret_len(&self) -> usize {
        self.len()
    }
}

impl SecretLen for Vec<u8> {
    fn secret_len(&self) -> usize {
        self.len()
    }
}

impl<T: SecretLen + ?Sized> SecretLen for &T {
    fn secret_len(&self) -> usize {
        (**self).secret_len()
    }
}

impl<T: SecretLen + ?Sized> SecretLen for Box<T> {
    fn secret_len(&self) -> usize {
        (**self).secret_len()
    }
}

impl<T: SecretLen + ?Sized> SecretLen for Rc<T> {
    fn secret_len(&self) -> usize {
        (**self).secret_len()
    }
}

impl<T: SecretLen + ?Sized> SecretLen for Arc<T> {
    fn secret_len(&self) -> usize {
        (**self).secret_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)] // read through Debug only
    struct Settings {
        url: Redacted<String>,
        token: Option<Redacted<String>>,
        body: Option<Redacted<Vec<u8>>>,
        shared: Redacted<Arc<str>>,
        view: Redacted<&'static [u8]>,
    }

    #[test]
    fn debug_shows_lengths_only() {
        let s = Settings {
            url: "redis://:hunter2@host".into(),
            token: Some(Redacted::new("s3cret".to_string())),
            body: Some(Redacted::new(b"Be terse.".to_vec())),
            shared: Redacted::new(Arc::from("top secret prompt")),
            view: Redacted::new(b"abc"),
        };
        let dbg = format!("{s:?} {s:#?}");
        for secret in ["hunter2", "s3cret", "terse", "secret prompt", "abc"] {
            assert!(!dbg.contains(secret), "{secret} leaked: {dbg}");
        }
        assert!(dbg.contains("url: <redacted 21 bytes>"), "{dbg}");
        assert!(dbg.contains("token: Some(<redacted 6 bytes>)"), "{dbg}");
        assert!(dbg.contains("body: Some(<redacted 9 bytes>)"), "{dbg}");
        assert!(dbg.contains("shared: <redacted 17 bytes>"), "{dbg}");
        assert!(dbg.contains("view: <redacted 3 bytes>"), "{dbg}");
    }

    /// `Probe::<T>::DISPLAY` is the inherent constant (true) when `T: Display`, else
    /// the blanket trait's (false): a `Display` added to `Redacted` fails this test.
    #[test]
    fn there_is_no_display() {
        struct Probe<T>(std::marker::PhantomData<T>);
        trait Fallback {
            const DISPLAY: bool = false;
        }
        impl<T> Fallback for Probe<T> {}
        impl<T: fmt::Display> Probe<T> {
            const DISPLAY: bool = true;
        }
        let display = [
            Probe::<String>::DISPLAY, // the probe itself works
            Probe::<Redacted<String>>::DISPLAY,
            Probe::<Redacted<&str>>::DISPLAY,
        ];
        assert_eq!(display, [true, false, false]);
    }

    #[test]
    fn the_value_is_reachable_only_on_purpose() {
        let r: Redacted<String> = "s3cret".into();
        assert_eq!(r.expose(), "s3cret");
        assert_eq!(r.clone(), Redacted::new("s3cret".to_string()));
        assert_ne!(r, Redacted::default());
        assert_eq!(r.into_inner(), "s3cret");
        let b: Box<str> = "xy".into();
        assert_eq!(format!("{:?}", Redacted::new(b)), "<redacted 2 bytes>");
        let rc: Rc<[u8]> = Rc::from(&b"xyz"[..]);
        assert_eq!(format!("{:?}", Redacted::new(rc)), "<redacted 3 bytes>");
    }
}
