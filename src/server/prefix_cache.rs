//! The prefix state cache: RWKV states after prompt prefixes seen before,
//! in an LRU bounded by bytes. A request whose prompt extends a cached
//! prefix starts from that state and reads only the rest; the engine reads
//! every token the same way however a prompt is split into steps, so the
//! answer is bit-identical to a cold start (tests/server.rs checks it).
//!
//! A plain list searched end to end: the byte bound keeps it to a few
//! hundred entries at most (a 0.1B model's state is 2.3 MB), and one
//! lookup per request costs far less than the step it saves.

use crate::state::StateData;

struct Entry {
    tokens: Vec<u32>,
    state: StateData,
    bytes: usize,
    last_used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

impl PrefixCache {
    /// Holds states of at most `limit` bytes in all (0 disables the cache).
    pub fn new(limit: usize) -> Self {
        Self { entries: Vec::new(), bytes: 0, limit, clock: 0 }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The state after the longest cached prefix of `prompt` that leaves at
    /// least one token to read (whose logits start the answer), and its length.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, &StateData)> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() < prompt.len() && prompt.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = self.clock;
        Some((best.tokens.len(), &best.state))
    }

    /// Whether `tokens` is cached already.
    pub fn contains(&self, tokens: &[u32]) -> bool {
        self.entries.iter().any(|e| e.tokens == tokens)
    }

    /// Keeps the state after `tokens`, evicting the least recently used
    /// entries to stay within the byte limit. A state larger than the whole
    /// limit is not kept.
    pub fn insert(&mut self, tokens: Vec<u32>, state: StateData) {
        let bytes = tokens.len() * 4 + state.fields.iter().map(|f| f.2.len() * 4).sum::<usize>();
        if tokens.is_empty() || bytes > self.limit || self.contains(&tokens) {
            return;
        }
        while self.bytes + bytes > self.limit {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes;
        }
        self.clock += 1;
        self.bytes += bytes;
        self.entries.push(Entry { tokens, state, bytes, last_used: self.clock });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> StateData {
        StateData { fields: vec![("s".into(), vec![n], vec![n as f32; n])] }
    }

    #[test]
    fn longest_prefix_leaving_a_token_and_lru_by_bytes() {
        // Each entry: its tokens (4 bytes each) and 10 floats; room for the
        // first three.
        let limit = 48 + 52 + 48;
        let mut c = PrefixCache::new(limit);
        c.insert(vec![1, 2], state(10));
        c.insert(vec![1, 2, 3], state(10));
        c.insert(vec![9, 9], state(10));
        assert_eq!(c.lookup(&[1, 2, 3, 4]).map(|(n, _)| n), Some(3));
        // The whole prompt cached: the shorter prefix, so a token is left to read.
        assert_eq!(c.lookup(&[1, 2, 3]).map(|(n, _)| n), Some(2));
        assert!(c.lookup(&[2, 3, 4]).is_none());
        // [9, 9] is the least recently used: a new entry evicts it.
        c.insert(vec![5, 5], state(10));
        assert!(!c.contains(&[9, 9]) && c.contains(&[1, 2]) && c.contains(&[5, 5]));
        assert!(c.bytes() <= limit);
        // Larger than the whole limit: not kept, nothing evicted.
        c.insert(vec![7], state(1000));
        assert_eq!(c.len(), 3);
        let mut off = PrefixCache::new(0);
        off.insert(vec![1], state(1));
        assert!(off.is_empty());
    }
}
