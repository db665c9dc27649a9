//! An account service whose replicas keep identical state with no shared database.
//!
//! Writes (open, deposit, withdraw, transfer) become events; every replica applies every event
//! through [`Bank`]'s [`Replica`] implementation. A command may reach any replica, whose view can
//! lag: a withdrawal or transfer is checked against that replica's state and published with the
//! account's `expected_position` (the position of the last event keyed by the account), so two
//! withdrawals racing through different replicas can never both pass: the second gets a conflict,
//! waits until its replica has caught up, checks again and retries.
//!
//! Money only leaves an account through events keyed by it, so a replica whose view misses an
//! incoming transfer can only under-estimate a balance: no balance ever goes negative.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use lockstep::{ApplyError, Client, EventMeta, NewEvent, Replica, StateHandle};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The bank's events, decoded from the log by type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum BankEvent {
    /// An account was opened (keyed by the account).
    #[serde(rename = "account.opened")]
    Opened {
        /// Its owner.
        owner: String,
    },
    /// Money was paid in (keyed by the account).
    #[serde(rename = "funds.deposited")]
    Deposited {
        /// Amount, in cents.
        amount: i64,
    },
    /// Money was paid out (keyed by the account).
    #[serde(rename = "funds.withdrawn")]
    Withdrawn {
        /// Amount, in cents.
        amount: i64,
    },
    /// Money moved to another account (keyed by the paying account).
    #[serde(rename = "funds.transferred")]
    Transferred {
        /// The receiving account.
        to: String,
        /// Amount, in cents.
        amount: i64,
    },
}

/// One account as every replica holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Its owner.
    pub owner: String,
    /// Balance, in cents.
    pub balance: i64,
    /// Position of the last event keyed by this account: the `expected_position` of the next.
    pub last_keyed: u64,
}

/// The replicated state: accounts by id. A `BTreeMap`, so its bytes are canonical.
pub type Accounts = BTreeMap<String, Account>;

/// The bank's [`Replica`].
pub struct Bank;

/// Fault injection for demonstrations and tests: the event type this process applies wrongly
/// (one cent too much), making its replica deliberately nondeterministic so that verification has
/// something to find. Set once, at start, from `BANK_MISAPPLY`.
static MISAPPLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes this process apply events of `event_type` wrongly (see [`MISAPPLY`]).
pub fn misapply(event_type: &str) {
    let _ = MISAPPLY.set(event_type.to_owned());
}

fn fault(meta: &EventMeta) -> i64 {
    i64::from(MISAPPLY.get().is_some_and(|t| *t == meta.event_type))
}

impl Replica for Bank {
    type State = Accounts;
    type Event = BankEvent;

    fn apply(state: &mut Accounts, event: BankEvent, meta: &EventMeta) -> Result<(), ApplyError> {
        let id = meta.key.clone().unwrap_or_default();
        match event {
            BankEvent::Opened { owner } => {
                let account = state.entry(id).or_default();
                account.owner = owner;
                account.last_keyed = meta.position;
            }
            BankEvent::Deposited { amount } => {
                let account = state.entry(id).or_default();
                account.balance += amount + fault(meta);
                account.last_keyed = meta.position;
            }
            BankEvent::Withdrawn { amount } => {
                let account = state.entry(id).or_default();
                account.balance -= amount + fault(meta);
                account.last_keyed = meta.position;
            }
            BankEvent::Transferred { to, amount } => {
                let from = state.entry(id).or_default();
                from.balance -= amount;
                from.last_keyed = meta.position;
                state.entry(to).or_default().balance += amount;
            }
        }
        Ok(())
    }

    /// Accounts by id, so `lockstep verify --explain` names the accounts that differ.
    fn entries(state: &Accounts) -> Option<lockstep::Entries> {
        Some(lockstep::hash_entries(state))
    }
}

/// A replica's HTTP service: commands become events, reads come from the replica's state.
#[derive(Clone)]
pub struct Service {
    /// Publishes commands' events.
    pub client: Client,
    /// This replica's state.
    pub state: StateHandle<Accounts>,
}

/// How often a command re-checks after a conflict before answering 409.
const MAX_ATTEMPTS: usize = 20;

/// Amount bodies.
#[derive(Debug, Deserialize)]
struct Amount {
    amount: i64,
}

#[derive(Debug, Deserialize)]
struct Transfer {
    to: String,
    amount: i64,
}

#[derive(Debug, Deserialize)]
struct Open {
    owner: String,
}

/// The routes: `POST /accounts/{id}` `{"owner"}`, `POST /accounts/{id}/deposit|withdraw`
/// `{"amount"}`, `POST /accounts/{id}/transfer` `{"to","amount"}`, `GET /accounts/{id}`.
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/accounts/{id}", post(open).get(balance))
        .route("/accounts/{id}/deposit", post(deposit))
        .route("/accounts/{id}/withdraw", post(withdraw))
        .route("/accounts/{id}/transfer", post(transfer))
        .with_state(service)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

async fn balance(State(s): State<Service>, Path(id): Path<String>) -> Response {
    match s
        .state
        .read(|accounts, position| accounts.get(&id).cloned().map(|a| (a, position)))
    {
        Some((account, position)) => answer(
            StatusCode::OK,
            json!({"id": id, "owner": account.owner, "balance": account.balance, "as_of": position}),
        ),
        None => answer(StatusCode::NOT_FOUND, json!({"error": "no such account"})),
    }
}

async fn open(
    State(s): State<Service>,
    Path(id): Path<String>,
    Json(body): Json<Open>,
) -> Response {
    let event = BankEvent::Opened { owner: body.owner };
    // expected_position 0: only if no event is keyed by this account yet.
    command(&s, &id, event, |_| Ok(0)).await
}

async fn deposit(
    State(s): State<Service>,
    Path(id): Path<String>,
    Json(Amount { amount }): Json<Amount>,
) -> Response {
    if let Some(refusal) = not_positive(amount) {
        return refusal;
    }
    command(&s, &id, BankEvent::Deposited { amount }, |a| {
        a.map(|a| a.last_keyed).ok_or("no such account")
    })
    .await
}

async fn withdraw(
    State(s): State<Service>,
    Path(id): Path<String>,
    Json(Amount { amount }): Json<Amount>,
) -> Response {
    if let Some(refusal) = not_positive(amount) {
        return refusal;
    }
    command(&s, &id, BankEvent::Withdrawn { amount }, can_pay(amount)).await
}

async fn transfer(
    State(s): State<Service>,
    Path(id): Path<String>,
    Json(Transfer { to, amount }): Json<Transfer>,
) -> Response {
    if amount <= 0 || to == id {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "a positive amount to another account"}),
        );
    }
    if s.state.read(|accounts, _| !accounts.contains_key(&to)) {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": "no such receiving account"}),
        );
    }
    command(
        &s,
        &id,
        BankEvent::Transferred { to, amount },
        can_pay(amount),
    )
    .await
}

/// The check of a payment out of an account: it exists and holds `amount`; then the expected
/// position is the account's last keyed event.
fn can_pay(amount: i64) -> impl Fn(Option<&Account>) -> Result<u64, &'static str> {
    move |account| match account {
        None => Err("no such account"),
        Some(a) if a.balance < amount => Err("insufficient funds"),
        Some(a) => Ok(a.last_keyed),
    }
}

/// A 400 answer unless `amount` is positive.
fn not_positive(amount: i64) -> Option<Response> {
    (amount <= 0).then(|| {
        answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "amount must be positive"}),
        )
    })
}

/// Checks `event` against this replica's view of account `id` with `check` (which returns the
/// expected position, or why not), publishes it, and on a conflict waits for the replica to
/// catch up and checks again.
async fn command(
    s: &Service,
    id: &str,
    event: BankEvent,
    check: impl Fn(Option<&Account>) -> Result<u64, &'static str>,
) -> Response {
    for _ in 0..MAX_ATTEMPTS {
        let expected = match s.state.read(|accounts, _| check(accounts.get(id))) {
            Ok(expected) => expected,
            Err(why) => return answer(StatusCode::CONFLICT, json!({"error": why})),
        };
        // `event` serializes as {"type": …, "data": …}: the envelope's two fields.
        let Ok(serde_json::Value::Object(mut tagged)) = serde_json::to_value(&event) else {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "encoding"}),
            );
        };
        let event_type = match tagged.remove("type") {
            Some(serde_json::Value::String(t)) => t,
            _ => {
                return answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "encoding"}),
                );
            }
        };
        let new = NewEvent {
            event_type,
            data: tagged
                .remove("data")
                .and_then(|d| serde_json::value::to_raw_value(&d).ok()),
            key: Some(id.to_owned()),
            source: Some("bank".to_owned()),
            expected_position: Some(expected),
            ..NewEvent::default()
        };
        match s.client.publish_one(&new).await {
            Ok(ack) => return answer(StatusCode::OK, json!({"position": ack.position})),
            Err(e) if e.is_conflict() => {
                // Someone else changed this account first: wait until this replica has seen it.
                let current = match &e {
                    lockstep::ClientError::Api { current, .. } => current.unwrap_or(0),
                    _ => 0,
                };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while s.state.position() < current && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Err(e) => {
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": e.to_string()}),
                );
            }
        }
    }
    answer(
        StatusCode::CONFLICT,
        json!({"error": "too much contention on this account; retry"}),
    )
}
