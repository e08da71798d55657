//! The revocation listener: a dedicated connection that `LISTEN`s on the
//! revocation channel and forwards each notification, reconnecting with
//! backoff when the connection is lost (see "Revocations" in the [`super`]
//! module doc).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Config};

use super::unavailable;
use crate::{Result, StoreError};

/// What the revocation listener reports
/// ([`PostgresStore::listen_revocations`](super::PostgresStore::listen_revocations)).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// The token with this `jti` was revoked by a committed batch (of any
    /// replica sharing the database, this one included).
    Token(String),
    /// Revocations may have been missed: the listening connection was lost
    /// and is listening again, the receiver fell behind and notifications
    /// were dropped, or a jti did not fit in a notification. Whatever the
    /// receiver caches about tokens must be dropped (re-read from the
    /// store).
    Resync,
}

/// Revocations buffered for the receiver; past this, notifications are
/// dropped and a [`Revocation::Resync`] follows.
pub const REVOCATION_QUEUE: usize = 1024;

/// Notifications buffered between the connection and the forwarding loop.
const NOTIFICATION_QUEUE: usize = 256;

/// First delay before reconnecting; doubled per failure up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the listener connects and checks its connection.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// The connection settings (the password inside is never printed:
    /// `Config`'s `Debug` redacts it).
    pub(super) config: Config,
    /// The TLS side of the connection.
    pub(super) tls: super::TlsConnector,
    /// The channel, a checked lowercase identifier.
    pub(super) channel: String,
    /// How often the connection is checked with a round trip, and how long
    /// that round trip may take.
    pub(super) heartbeat: Duration,
    /// How long establishing the connection may take.
    pub(super) connect_timeout: Duration,
}

/// Subscribes (connects and `LISTEN`s), then hands the subscription to a
/// task that forwards notifications and re-subscribes when it is lost.
/// Every revocation committed after this returns is delivered as a
/// [`Revocation::Token`], or covered by a later [`Revocation::Resync`].
pub(super) async fn start(
    settings: Settings,
    closed: watch::Receiver<bool>,
) -> Result<mpsc::Receiver<Revocation>> {
    if *closed.borrow() {
        return Err(StoreError::Unavailable("store closed".into()));
    }
    let subscription = subscribe(&settings).await?;
    let (out, receiver) = mpsc::channel(REVOCATION_QUEUE);
    tokio::spawn(run(settings, subscription, out, closed));
    Ok(receiver)
}

/// A live `LISTEN`: the client (for heartbeats) and the notifications its
/// connection receives.
struct Subscription {
    client: Client,
    payloads: mpsc::Receiver<String>,
}

async fn subscribe(settings: &Settings) -> Result<Subscription> {
    let (client, mut connection) = settings
        .config
        .connect(settings.tls.make())
        .await
        .map_err(|e| unavailable("connect the revocation listener", &e))?;
    let (sender, payloads) = mpsc::channel(NOTIFICATION_QUEUE);
    let channel = settings.channel.clone();
    // Drives the connection; ends (dropping `sender`) when it closes.
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if note.channel() == channel
                        && sender.send(note.payload().to_owned()).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    // The channel is a checked identifier: nothing to quote.
    tokio::time::timeout(
        settings.heartbeat,
        client.batch_execute(&format!("LISTEN {}", settings.channel)),
    )
    .await
    .map_err(|_| StoreError::Unavailable("LISTEN timed out".into()))?
    .map_err(|e| unavailable("LISTEN for revocations", &e))?;
    Ok(Subscription { client, payloads })
}

/// Forwards until the receiver or the store is gone.
async fn run(
    settings: Settings,
    mut subscription: Subscription,
    out: mpsc::Sender<Revocation>,
    mut closed: watch::Receiver<bool>,
) {
    // Set when something may have been missed and the receiver has not yet
    // been told to resync.
    let mut missed = false;
    loop {
        let mut heartbeat = tokio::time::interval(settings.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the subscription was just checked.
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = closed.changed() => return,
                () = out.closed() => return,
                permit = out.reserve(), if missed => match permit {
                    Ok(permit) => {
                        permit.send(Revocation::Resync);
                        missed = false;
                    }
                    Err(_) => return,
                },
                payload = subscription.payloads.recv() => match payload {
                    Some(payload) => {
                        let revocation = if payload.is_empty() {
                            Revocation::Resync
                        } else {
                            Revocation::Token(payload)
                        };
                        match out.try_send(revocation) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => missed = true,
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    // The connection is gone.
                    None => break,
                },
                _ = heartbeat.tick() => {
                    let alive = tokio::time::timeout(
                        settings.heartbeat,
                        subscription.client.simple_query("SELECT 1"),
                    )
                    .await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        drop(subscription);
        // Whatever was committed while not listening is unknown.
        missed = true;
        let mut delay = MIN_BACKOFF;
        subscription = loop {
            tokio::select! {
                _ = closed.changed() => return,
                () = out.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
            let limit = settings.heartbeat + settings.connect_timeout;
            let attempt = tokio::time::timeout(limit, subscribe(&settings))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "no LISTEN within {limit:?}"
                    )))
                });
            match attempt {
                Ok(subscription) => break subscription,
                Err(error) => {
                    // The error names the host and the cause, never the
                    // password.
                    tracing::warn!(
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "PostgreSQL revocation listener cannot reconnect: {error}"
                    );
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
        tracing::info!("PostgreSQL revocation listener reconnected");
    }
}
