//! Console sessions: a random 256-bit id in an `HttpOnly`, `SameSite=Strict`
//! cookie (`Secure` behind TLS), held in memory by its SHA-256 (the id
//! itself is never stored), with the admin's name and roles as they were
//! at sign-in and a CSRF token for the forms of that session.
//!
//! Bounded: a session lasts at most [`SESSION_TTL`]; at most
//! [`MAX_SESSIONS`] live at once (signing in past that ends the oldest).
//! Signing out ends the session at once. Sessions do not survive a
//! restart, and each replica has its own: a person signs in again.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use portcullis_config::Role;
use subtle::ConstantTimeEq as _;

/// The session cookie's name.
pub const COOKIE: &str = "portcullis_console";
/// The sign-in form's anti-forgery cookie (double submit).
pub const LOGIN_COOKIE: &str = "portcullis_console_login";
/// Longest a session lasts, signed in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions at once.
pub const MAX_SESSIONS: usize = 1024;

/// A signed-in person.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub admin: String,
    pub roles: Vec<Role>,
    pub csrf: String,
    expires: Instant,
}

impl Session {
    /// Whether the person holds `role`.
    pub(crate) fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether `token` is this session's CSRF token (constant time).
    pub(crate) fn csrf_ok(&self, token: &str) -> bool {
        !token.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// The live sessions.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn key(id: &str) -> String {
    portcullis_token::sha256_hex(id.as_bytes())
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a session for `admin`; returns its id (the cookie value).
    /// `None` when the system gives no randomness.
    pub(crate) fn open(&self, admin: &str, roles: &[Role]) -> Option<String> {
        let id = portcullis_token::random_token("cs_").ok()?;
        let csrf = portcullis_token::random_token("csrf_").ok()?;
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            key(&id),
            Session {
                admin: admin.to_owned(),
                roles: roles.to_vec(),
                csrf,
                expires: now + SESSION_TTL,
            },
        );
        Some(id)
    }

    /// The live session of cookie value `id`.
    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let k = key(id);
        let mut map = self.lock();
        match map.get(&k) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends the session of cookie value `id`.
    pub(crate) fn end(&self, id: &str) {
        self.lock().remove(&key(id));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_end_and_are_bounded() {
        let s = Sessions::default();
        let id = s.open("ops", &[Role::Auditor]).unwrap();
        let got = s.get(&id).unwrap();
        assert_eq!(got.admin, "ops");
        assert!(got.has(Role::Auditor) && !got.has(Role::Approver));
        assert!(got.csrf_ok(&got.csrf.clone()));
        assert!(!got.csrf_ok("csrf_wrong") && !got.csrf_ok(""));
        s.end(&id);
        assert!(s.get(&id).is_none());
        let first = s.open("a", &[]).unwrap();
        for _ in 0..MAX_SESSIONS {
            s.open("b", &[]).unwrap();
        }
        assert!(s.get(&first).is_none(), "the oldest made room");
        assert_eq!(s.lock().len(), MAX_SESSIONS);
    }
}
