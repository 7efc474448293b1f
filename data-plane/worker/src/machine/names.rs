//! Named prepared statements and portals, as the server has them.
//!
//! A name is bound only when the server confirms it (`ParseComplete`,
//! `BindComplete`, a `PREPARE`'s `CommandComplete`) and dropped when it
//! confirms that (`CloseComplete`, `DEALLOCATE`, `DISCARD ALL`, the end of a
//! transaction for portals). Until then a change is *unsettled*: a later
//! message that names it waits for the answer, except inside the same batch
//! (up to `Sync`, or within one `Query`), where the server runs messages only
//! while all before them succeeded, so the batch's own changes are known.

use std::collections::HashMap;
use std::sync::Arc;

/// A change a forwarded message makes to the names once the server
/// confirms it.
#[derive(Debug)]
pub(crate) enum Change<T> {
    Set(String, Arc<T>),
    Drop(String),
    /// Every name (`DEALLOCATE ALL`, `DISCARD ALL`, a transaction's end for
    /// portals). `always`: made even if the message fails, as code the
    /// worker cannot see may have changed names before failing.
    DropAll {
        always: bool,
    },
}

impl<T> Change<T> {
    fn name(&self) -> Option<&str> {
        match self {
            Change::Set(name, _) | Change::Drop(name) => Some(name),
            Change::DropAll { .. } => None,
        }
    }
}

/// What a bound name costs the worker to keep, in bytes (about).
pub(crate) trait Weighed {
    fn weight(&self) -> usize;
}

impl<T: Weighed> Change<T> {
    /// What the binding it makes weighs; nothing for a drop.
    pub fn weight(&self) -> usize {
        match self {
            Change::Set(_, value) => value.weight(),
            _ => 0,
        }
    }
}

/// What a name refers to for a message being read now.
#[derive(Debug)]
pub(crate) enum Lookup<T> {
    Known(Arc<T>),
    /// Not bound, as far as the server has said.
    Unknown,
    /// A change to it is on its way and the outcome is not known yet.
    Unsettled,
}

#[derive(Debug)]
pub(crate) struct Names<T> {
    confirmed: HashMap<String, Arc<T>>,
    /// Changes made by the open batch's messages, read in order.
    batch: HashMap<String, Option<Arc<T>>>,
    /// The open batch dropped every name.
    batch_dropped_all: bool,
    /// Forwarded, unconfirmed changes per name.
    unsettled: HashMap<String, u32>,
    unsettled_all: u32,
    /// Weight of the confirmed names and of the bindings on their way.
    held: usize,
}

impl<T> Default for Names<T> {
    fn default() -> Self {
        Self {
            confirmed: HashMap::new(),
            batch: HashMap::new(),
            batch_dropped_all: false,
            unsettled: HashMap::new(),
            unsettled_all: 0,
            held: 0,
        }
    }
}

impl<T: Weighed> Names<T> {
    pub fn lookup(&self, name: &str) -> Lookup<T> {
        if let Some(entry) = self.batch.get(name) {
            return entry.clone().map_or(Lookup::Unknown, Lookup::Known);
        }
        if self.batch_dropped_all {
            return Lookup::Unknown;
        }
        if self.unsettled_all > 0 || self.unsettled.contains_key(name) {
            return Lookup::Unsettled;
        }
        self.confirmed
            .get(name)
            .cloned()
            .map_or(Lookup::Unknown, Lookup::Known)
    }

    /// A message making `change` is forwarded (or about to be). `in_batch`:
    /// later messages of the same batch see it at once.
    pub fn stage(&mut self, change: &Change<T>, in_batch: bool) {
        self.held += change.weight();
        match change.name() {
            Some(name) => *self.unsettled.entry(name.to_owned()).or_default() += 1,
            None => self.unsettled_all += 1,
        }
        if in_batch {
            match change {
                Change::Set(name, value) => {
                    self.batch.insert(name.clone(), Some(value.clone()));
                }
                Change::Drop(name) => {
                    self.batch.insert(name.clone(), None);
                }
                Change::DropAll { .. } => {
                    self.batch.clear();
                    self.batch_dropped_all = true;
                }
            }
        }
    }

    /// The server answered the message that made `change`: `ok` if it ran.
    pub fn settle(&mut self, change: Change<T>, ok: bool) {
        self.held = self.held.saturating_sub(change.weight());
        match change.name() {
            Some(name) => {
                if let Some(n) = self.unsettled.get_mut(name) {
                    *n -= 1;
                    if *n == 0 {
                        self.unsettled.remove(name);
                    }
                }
            }
            None => self.unsettled_all = self.unsettled_all.saturating_sub(1),
        }
        match change {
            Change::Set(name, value) if ok => {
                self.held += value.weight();
                if let Some(old) = self.confirmed.insert(name, value) {
                    self.held = self.held.saturating_sub(old.weight());
                }
            }
            Change::Drop(name) if ok => {
                if let Some(old) = self.confirmed.remove(&name) {
                    self.held = self.held.saturating_sub(old.weight());
                }
            }
            Change::DropAll { always } if ok || always => {
                for old in self.confirmed.values() {
                    self.held = self.held.saturating_sub(old.weight());
                }
                self.confirmed.clear();
            }
            _ => {}
        }
    }

    /// The open batch ends (`Sync`, or a `Query`'s end).
    pub fn end_batch(&mut self) {
        self.batch.clear();
        self.batch_dropped_all = false;
    }

    /// What the confirmed names and the bindings on their way weigh.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Bound names, as the server confirmed them.
    #[cfg(test)]
    pub fn confirmed(&self) -> usize {
        self.confirmed.len()
    }

    /// Whether nothing is unsettled.
    #[cfg(test)]
    pub fn settled(&self) -> bool {
        self.unsettled.is_empty() && self.unsettled_all == 0
    }
}
