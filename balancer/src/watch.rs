//! Watches for split brain: a dialog acted on by two nodes. The balancer sees every message a
//! node sends (requests and responses both go through it: it record-routes), so it can tell when
//! a node sends something in a dialog after another node took that dialog over, which is what
//! the cluster's fencing exists to prevent (a frozen node that thaws, a node cut off from the
//! store). Each such act is counted (`dialogs_acted_on_by_two_nodes`) and logged; a dialog that
//! moves to a new node without the old one acting again is counted as moved.
//!
//! An actor is a node process: its id and its session (a restarted node is a new actor, so a
//! dialog a restarted node takes back is a move, not a double act). A node that took a dialog
//! over, lost it to a third node and legitimately takes it back with the same session would be
//! counted as acting again; the cluster does not do that within [`ActWatch`]'s idle window.
//!
//! Sans-IO, time injected; bounded: at most `capacity` dialogs are remembered, each forgotten
//! `idle` after its last act (the oldest first when full). It keeps hashes only, not Call-IDs,
//! and it does not change routing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Who acted: a node process (hashes of its id and of its session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Actor {
    /// Hash of the node id.
    pub node: u64,
    /// The node's session tag (from its session id, random per process start).
    pub session: u64,
}

/// What one act was, for a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first act seen in this dialog (within the window).
    New,
    /// The same actor as the last act.
    Same,
    /// A new actor took the dialog (a takeover).
    Moved,
    /// An actor that had acted before, after another one took the dialog: split brain.
    Again,
}

#[derive(Debug)]
struct Entry {
    current: Actor,
    /// Earlier actors of the dialog, oldest first (at most [`EARLIER`]).
    earlier: Vec<Actor>,
    last: Instant,
}

/// Earlier actors remembered per dialog.
const EARLIER: usize = 4;

/// The dialogs recently acted on, and by whom.
#[derive(Debug)]
pub struct ActWatch {
    entries: HashMap<u64, Entry>,
    /// Dialogs in the order of their act when queued; an entry acted on since is queued again
    /// when it reaches the front.
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    idle: Duration,
    evicted: u64,
}

impl ActWatch {
    /// A watch remembering at most `capacity` dialogs, each for `idle` after its last act.
    pub fn new(capacity: usize, idle: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            idle,
            evicted: 0,
        }
    }

    /// Dialogs remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no dialog is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Dialogs forgotten before their window ended because the watch was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// `actor` sent a message in `dialog` (a hash of its Call-ID) at `now`.
    pub fn observe(&mut self, now: Instant, dialog: u64, actor: Actor) -> Seen {
        self.expire(now);
        if let Some(e) = self.entries.get_mut(&dialog) {
            e.last = now;
            if e.current == actor {
                return Seen::Same;
            }
            let again = e.earlier.contains(&actor);
            e.earlier.retain(|a| *a != actor);
            if e.earlier.len() == EARLIER {
                e.earlier.remove(0);
            }
            e.earlier.push(e.current);
            e.current = actor;
            return if again { Seen::Again } else { Seen::Moved };
        }
        while self.entries.len() >= self.capacity {
            let Some((key, _)) = self.order.pop_front() else {
                break;
            };
            if self.entries.remove(&key).is_some() {
                self.evicted += 1;
            }
        }
        self.entries.insert(
            dialog,
            Entry {
                current: actor,
                earlier: Vec::new(),
                last: now,
            },
        );
        self.order.push_back((dialog, now));
        Seen::New
    }

    /// Forgets the dialogs idle for the window; those acted on since they were queued go to
    /// the back of the queue.
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, queued)) = self.order.front() {
            if now.saturating_duration_since(queued) < self.idle {
                return;
            }
            self.order.pop_front();
            match self.entries.get(&key) {
                Some(e) if now.saturating_duration_since(e.last) >= self.idle => {
                    self.entries.remove(&key);
                }
                Some(e) => self.order.push_back((key, e.last)),
                None => {}
            }
        }
    }
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn actor(node: u64, session: u64) -> Actor {
        Actor { node, session }
    }

    #[test]
    fn a_takeover_is_a_move_and_the_old_node_acting_again_is_split_brain() {
        let t0 = Instant::now();
        let mut w = ActWatch::new(16, Duration::from_secs(64));
        let (a, b) = (actor(1, 10), actor(2, 20));
        assert_eq!(w.observe(t0, 7, a), Seen::New);
        assert_eq!(w.observe(t0, 7, a), Seen::Same);
        assert_eq!(w.observe(t0, 7, b), Seen::Moved);
        assert_eq!(w.observe(t0, 7, b), Seen::Same);
        // The frozen node thaws and answers in the dialog.
        assert_eq!(w.observe(t0, 7, a), Seen::Again);
        // A restarted node (new session) taking a dialog back is a move.
        assert_eq!(w.observe(t0, 8, a), Seen::New);
        assert_eq!(w.observe(t0, 8, b), Seen::Moved);
        assert_eq!(w.observe(t0, 8, actor(1, 11)), Seen::Moved);
    }

    #[test]
    fn dialogs_are_forgotten_after_the_window_and_the_oldest_go_first_when_full() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(10);
        let mut w = ActWatch::new(2, idle);
        let (a, b) = (actor(1, 1), actor(2, 2));
        w.observe(t0, 1, a);
        w.observe(t0 + Duration::from_secs(5), 2, a);
        // Dialog 1 acted on again at 8 s: kept past 10 s, dialog 2 is not past 15 s.
        w.observe(t0 + Duration::from_secs(8), 1, a);
        w.observe(t0 + Duration::from_secs(12), 3, b);
        assert_eq!(
            w.len(),
            2,
            "dialog 1 kept, the new one in; dialog 2 evicted when full"
        );
        assert_eq!(w.evicted(), 1);
        assert_eq!(w.observe(t0 + Duration::from_secs(13), 1, b), Seen::Moved);
        // After its window a dialog starts afresh: the old actor is no longer remembered.
        assert_eq!(w.observe(t0 + Duration::from_secs(30), 1, a), Seen::New);
        assert!(w.len() <= 2);
    }

    #[test]
    fn it_stays_bounded_under_many_dialogs() {
        let t0 = Instant::now();
        let mut w = ActWatch::new(1000, Duration::from_secs(64));
        for i in 0..100_000u64 {
            w.observe(t0 + Duration::from_millis(i), i, actor(i % 3, 0));
            assert!(w.len() <= 1000);
            assert!(w.order.len() <= 1000);
        }
    }
}
