//! Reading the log: pages of events in order, by position or time, with long-polling.
//!
//! A page is rendered straight from redb into its JSON body, so memory per request is bounded by
//! the page limits below, never by the log's length.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use lockstep_proto::TypeFilter;
use lockstep_proto::names::is_reserved;
use lockstep_proto::wire::{EventJsonWriter, write_event_json};
use tokio::sync::watch;

use crate::error::ReadError;
use crate::log::Log;

/// Most events one page may hold.
pub const MAX_LIMIT: usize = 10_000;
/// Events per page when the client names no limit.
pub const DEFAULT_LIMIT: usize = 1_000;
/// A page stops growing past this many bytes of JSON (it always holds at least one event).
pub const MAX_PAGE_BYTES: usize = 8 << 20;
/// Events one page may skip over because of a type filter before it is returned, so a sparse
/// filter on a long log answers in bounded time; the client continues from `next_after`.
pub const SCAN_BUDGET: usize = 100_000;
/// Longest long-poll, in milliseconds.
pub const MAX_WAIT_MS: u64 = 60_000;

/// A validated read request.
#[derive(Debug, Clone, Default)]
pub struct ReadQuery {
    /// Start after this position (0: from the beginning).
    pub after: u64,
    /// Most events to return.
    pub limit: usize,
    /// Which types to return.
    pub filter: TypeFilter,
    /// Start at the first event at or after this time (ns).
    pub since_ns: Option<i64>,
    /// Stop before the first event after this time (ns).
    pub until_ns: Option<i64>,
    /// How long to wait for a new event when there is none yet.
    pub wait: Duration,
    /// Control records (`lockstep.*`) pass whatever `filter` says, as subscriptions need.
    pub with_control: bool,
    /// Stop after this position.
    pub until_position: Option<u64>,
    /// Return events superseded by a rollback too (marked `"superseded": true`); by default they
    /// are skipped, as they are no longer part of the live log.
    pub include_superseded: bool,
    /// How the events are laid out in the body.
    pub layout: Layout,
}

/// How a page's events are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Layout {
    /// The JSON object of `GET /v1/events`: `{"head", "next_after", "events": [...]}`.
    #[default]
    Page,
    /// One event JSON per line (NDJSON), nothing else: for streams.
    Lines,
}

/// One page of events.
pub struct Page {
    /// The body, laid out as the query asked.
    pub body: Vec<u8>,
    /// Events in the page.
    pub count: usize,
    /// Where the next page starts (`after`).
    pub next_after: u64,
    /// The head when the page was read.
    pub head: u64,
    /// The query's `until`/`until_position` is reached: no later event can match.
    pub complete: bool,
}

/// Reads one page, waiting up to `query.wait` for an event if there is none yet. Returns early
/// with what it has when `shutdown` turns true.
pub async fn read_page(
    log: &Log,
    mut query: ReadQuery,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Page, ReadError> {
    let head = log.tip().position;
    if query.after > head {
        return Err(ReadError::Invalid {
            code: "after_past_head",
            message: format!("after={} is past the head of the log ({head})", query.after),
        });
    }
    if let Some(since) = query.since_ns {
        let log = log.clone();
        let first = blocking(move || log.first_at_or_after(since)).await??;
        query.after = query.after.max(first - 1);
    }
    let deadline = Instant::now() + query.wait;
    let mut tips = log.watch_tip();
    loop {
        // Marked seen before the scan: a commit landing during the scan wakes the wait below.
        let tip = *tips.borrow_and_update();
        let scan = {
            let (log, query) = (log.clone(), query.clone());
            blocking(move || scan_page(&log, &query, tip.position)).await??
        };
        let now = Instant::now();
        if scan.count > 0 || scan.complete || scan.budget_spent || now >= deadline {
            return Ok(scan.into_page(tip.position));
        }
        query.after = scan.next_after;
        tokio::select! {
            changed = tips.changed() => if changed.is_err() {
                return Ok(scan.into_page(tip.position));
            },
            _ = tokio::time::sleep_until((deadline).into()) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(scan.into_page(tip.position)),
        }
    }
}

/// The JSON of the single event at `position`.
pub async fn read_one(log: &Log, position: u64) -> Result<Vec<u8>, ReadError> {
    let log = log.clone();
    let superseded = log.superseded().contains(position);
    let found = blocking(move || {
        log.get(position, |record, hash| {
            let mut out = Vec::with_capacity(512);
            write_event_json(&mut out, record, hash);
            if superseded {
                out.pop();
                out.extend_from_slice(b",\"superseded\":true}");
            }
            out
        })
    })
    .await??;
    found.ok_or(ReadError::NotFound(position))
}

struct Scan {
    /// The body so far: for a page, the opening of the object and the events.
    body: Vec<u8>,
    layout: Layout,
    count: usize,
    next_after: u64,
    complete: bool,
    budget_spent: bool,
}

impl Scan {
    fn into_page(self, head: u64) -> Page {
        let mut body = self.body;
        if self.layout == Layout::Page {
            fill_slot(&mut body, HEAD_SLOT, head);
            fill_slot(&mut body, NEXT_AFTER_SLOT, self.next_after);
            body.push(b']');
            if self.complete {
                body.extend_from_slice(b",\"complete\":true");
            }
            body.push(b'}');
        }
        Page {
            body,
            count: self.count,
            next_after: self.next_after,
            head,
            complete: self.complete,
        }
    }
}

/// A page opens with `head` and `next_after`, before the events, so a client can send its next
/// read before it has parsed this page (read-ahead). Their values are only known after the scan,
/// so the opening leaves 20 spaces for each (JSON allows whitespace after a number) and the scan
/// fills them in.
const PAGE_OPENING: &[u8] =
    b"{\"head\":                    ,\"next_after\":                    ,\"events\":[";
const HEAD_SLOT: usize = 8;
const NEXT_AFTER_SLOT: usize = 42;

fn fill_slot(body: &mut [u8], at: usize, value: u64) {
    let digits = value.to_string();
    body[at..at + digits.len()].copy_from_slice(digits.as_bytes());
}

/// Bytes reserved per requested event up front, so a page rarely grows (and copies) its buffer.
const RESERVE_PER_EVENT: usize = 512;

fn scan_page(log: &Log, query: &ReadQuery, head: u64) -> Result<Scan, ReadError> {
    let mut events = Vec::with_capacity((query.limit * RESERVE_PER_EVENT).min(MAX_PAGE_BYTES));
    if query.layout == Layout::Page {
        events.extend_from_slice(PAGE_OPENING);
    }
    let mut writer = EventJsonWriter::default();
    let mut count = 0;
    let mut scanned = 0;
    let mut next_after = query.after;
    let mut passed_until = false;
    let filter_all = query.filter.is_all();
    let superseded = log.superseded();
    let none_superseded = superseded.is_empty();
    let mut full = false;
    // Scans from `next_after`; a superseded range that is not wanted ends the scan, which starts
    // again after the range instead of reading through it.
    let mut skip_to = None;
    loop {
        if let Some(last) = skip_to.take() {
            next_after = last;
            if next_after >= head {
                break;
            }
        }
        log.scan(next_after, |record, hash| {
            if record.position > head {
                // Committed after this page's head was taken: leave it for the next page.
                return ControlFlow::Break(());
            }
            if query.until_ns.is_some_and(|until| record.time_ns > until)
                || query
                    .until_position
                    .is_some_and(|until| record.position > until)
            {
                passed_until = true;
                return ControlFlow::Break(());
            }
            scanned += 1;
            let range = if none_superseded {
                None
            } else {
                superseded.range_of(record.position)
            };
            if let (Some((_, last)), false) = (range, query.include_superseded) {
                skip_to = Some(last.min(head).min(query.until_position.unwrap_or(u64::MAX)));
                return ControlFlow::Break(());
            }
            // `since` became a position when the read began; an event committed later (during a
            // long-poll on a future `since`) can still be older than `since`, so check its time too.
            let after_since = query.since_ns.is_none_or(|since| record.time_ns >= since);
            let selected = filter_all
                || query.filter.matches(record.event_type)
                || (query.with_control && is_reserved(record.event_type));
            if after_since && selected {
                match query.layout {
                    Layout::Page if count > 0 => events.push(b','),
                    _ => {}
                }
                writer.write(&mut events, record, hash);
                if range.is_some() {
                    // The object's closing brace is its last byte.
                    events.pop();
                    events.extend_from_slice(b",\"superseded\":true}");
                }
                if query.layout == Layout::Lines {
                    events.push(b'\n');
                }
                count += 1;
            }
            next_after = record.position;
            if count >= query.limit || events.len() >= MAX_PAGE_BYTES || scanned >= SCAN_BUDGET {
                full = true;
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if skip_to.is_none() || full || passed_until {
            break;
        }
    }
    // Broker times never decrease, so once `until` is behind the clock no future event matches.
    let until_behind_clock = query.until_ns.is_some_and(|until| {
        next_after == head
            && chrono::Utc::now()
                .timestamp_nanos_opt()
                .is_some_and(|now| now > until)
    });
    let reached_end_position = query
        .until_position
        .is_some_and(|until| next_after >= until);
    Ok(Scan {
        body: events,
        layout: query.layout,
        count,
        next_after,
        complete: passed_until || until_behind_clock || reached_end_position,
        budget_spent: scanned >= SCAN_BUDGET,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReadError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ReadError::Store(crate::error::StoreError::new(format!(
            "read task failed: {e}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opening_slots_hold_any_u64() {
        assert_eq!(&PAGE_OPENING[HEAD_SLOT - 8..HEAD_SLOT], b"{\"head\":");
        assert_eq!(
            &PAGE_OPENING[NEXT_AFTER_SLOT - 13..NEXT_AFTER_SLOT],
            b"\"next_after\":"
        );
        let mut body = PAGE_OPENING.to_vec();
        fill_slot(&mut body, HEAD_SLOT, u64::MAX);
        fill_slot(&mut body, NEXT_AFTER_SLOT, 7);
        body.extend_from_slice(b"]}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["head"], u64::MAX);
        assert_eq!(v["next_after"], 7);
        assert_eq!(v["events"], serde_json::json!([]));
    }
}
