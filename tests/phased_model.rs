//! The phased-request protocol, model-checked with stateright.
//!
//! One key. Two clients (each sends one request, with bodies of its own, and may retry
//! once), the completer (it frees unstarted requests and takes over started ones), an
//! operator's `forget`, and the end of the key's replay window (expiry, then the sweep).
//! Every action is atomic as one database statement or one external call is; a holder may
//! pause between any two of them for as long as the others act, and any lease may run
//! out at any moment. The checker visits every interleaving.
//!
//! An asynchronous standby copies the database whenever it catches up, and a failover
//! (once) puts its copy in the primary's place, losing what it had not received; the
//! standby of the new primary starts from its copy (issue 22).
//!
//! The rules come in three forms: [`Rules::CURRENT`], what `src/phased/` does with
//! standby confirmation (`Config::with_standby_confirmation`); [`Rules::UNCONFIRMED`],
//! the same without it; and [`Rules::BEFORE`], what it did before issue 21 (a re-created
//! row's token started at 1 again, and downstream keys were derived from the scope, the
//! key and the step alone). The properties hold for the first; for the others the checker
//! finds the faults, and the tests print the traces.

use std::collections::{BTreeMap, BTreeSet};

use stateright::{Checker, Model, Path, Property};

/// How grants draw tokens and how steps derive downstream keys.
#[derive(Clone, Copy, Debug)]
struct Rules {
    /// A token no grant ever handed out before (random 63 bits in the crate); else a new
    /// row starts at 1 and a takeover adds one.
    fresh_tokens: bool,
    /// Downstream keys from the row's nonce; else from the scope, key and step alone.
    keys_from_nonce: bool,
    /// A holder calls the other system only once the standby has its row's creation.
    confirm_before_call: bool,
}

impl Rules {
    const CURRENT: Rules = Rules {
        fresh_tokens: true,
        keys_from_nonce: true,
        confirm_before_call: true,
    };
    const UNCONFIRMED: Rules = Rules {
        confirm_before_call: false,
        ..Rules::CURRENT
    };
    const BEFORE: Rules = Rules {
        fresh_tokens: false,
        keys_from_nonce: false,
        confirm_before_call: false,
    };
}

/// A holder's place in the operation: the next thing it does.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Pc {
    /// Has not taken the request (yet, or again after losing it).
    Idle,
    /// Holds it: next records the operation and its input (renewing the lease).
    Start,
    /// Next runs the local step: writes a charge row and records it, in one transaction.
    Local,
    /// Next calls the processor with the step's downstream key (no database involved).
    Call,
    /// The call returned: next records its answer.
    Record,
    /// Next runs the final step: ends the request and stores the response.
    Finish,
    /// Answered, refused, or fenced out.
    Done,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Holder {
    /// The request it serves (its body); `None`: the completer, which serves the row's.
    request: Option<u8>,
    pc: Pc,
    /// The grant it holds: the row's generation then, and its token.
    generation: u8,
    token: u64,
    /// Takes it may still try (a client's retries; the completer's passes).
    takes: u8,
}

/// The `idempotency_requests` row.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Row {
    /// Which creation of a row for the key this is (the model's bookkeeping: the
    /// database cannot tell two creations apart, which is the point).
    generation: u8,
    request: u8,
    token: u64,
    /// The nonce downstream keys are derived from: drawn at creation.
    nonce: u8,
    leased: bool,
    /// Recorded progress: the next step a taker resumes at.
    resume_at: Pc,
}

/// What the standby has: the database as it was when it last caught up.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Replica {
    row: Option<Row>,
    answered: Option<u8>,
    charges: Vec<u8>,
    /// Rows created up to then (generations are numbered in order).
    generations: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    row: Option<Row>,
    /// The key's stored response: the generation that stored it.
    answered: Option<u8>,
    holders: Vec<Holder>,
    /// Charge rows written, by the generation of the row they were recorded in.
    charges: Vec<u8>,
    standby: Replica,
    /// Failovers that may still happen; times the standby may still catch up.
    failovers: u8,
    catch_ups: u8,
    /// The request each generation serves: its own, or, for a row created again after a
    /// failover lost one, the lost row's (the client's retry of the same request).
    request_of: BTreeMap<u8, u8>,
    /// A request body whose row a failover lost, and the request that row served.
    lost: Option<(u8, u8)>,
    /// Processor calls: (the caller's generation, the downstream key it sent).
    calls: BTreeSet<(u8, u8)>,
    /// Writes that committed for a holder whose grant was on another row.
    fenced_out_writes: u8,
    next_generation: u8,
    next_token: u64,
    /// How often a lease may still run out; the completer may still free an unstarted
    /// request; the operator may still forget the key; the key's window may still end.
    expiries: u8,
    frees: u8,
    forgets: u8,
    windows: u8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    Take(usize),
    Step(usize),
    LeaseRunsOut,
    CompleterFrees,
    Forget,
    WindowEnds,
    StandbyCatchesUp,
    Failover,
    /// A holder whose standby confirmation ran out: no call; it releases the request.
    GiveUp(usize),
}

impl State {
    /// The database as the standby would copy it now.
    fn replica(&self) -> Replica {
        Replica {
            row: self.row.clone(),
            answered: self.answered,
            charges: self.charges.clone(),
            generations: self.next_generation,
        }
    }
}

/// How often each outside event may happen in one run. Each is a budget the checker
/// spends in every possible order; the failover runs spend less on the others, since a
/// standby's copy of the database multiplies the states.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    expiries: u8,
    frees: u8,
    forgets: u8,
    windows: u8,
    failovers: u8,
    /// How often the standby may catch up.
    catch_ups: u8,
}

impl Bounds {
    const NO_FAILOVER: Bounds = Bounds {
        expiries: 3,
        frees: 1,
        forgets: 1,
        windows: 1,
        failovers: 0,
        catch_ups: 0,
    };
    const FAILOVER: Bounds = Bounds {
        expiries: 2,
        frees: 1,
        forgets: 0,
        windows: 1,
        failovers: 1,
        catch_ups: 2,
    };
}

struct PhasedModel {
    rules: Rules,
    bounds: Bounds,
}

impl PhasedModel {
    /// The token of a new grant; `previous`: the row's, on a takeover.
    fn token(&self, state: &mut State, previous: Option<u64>) -> u64 {
        if self.rules.fresh_tokens {
            state.next_token += 1;
            state.next_token
        } else {
            previous.map_or(1, |token| token + 1)
        }
    }
}

/// A fenced write by holder `h`: commits only while the row has its token; records when
/// that token was granted on another row. `None`: fenced out.
fn fenced(state: &mut State, h: usize) -> Option<&mut Row> {
    let holder = &state.holders[h];
    let (generation, token) = (holder.generation, holder.token);
    match &mut state.row {
        Some(row) if row.token == token => {
            if row.generation != generation {
                state.fenced_out_writes += 1;
            }
            state.row.as_mut()
        }
        _ => None,
    }
}

impl Model for PhasedModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let client = |request| Holder {
            request: Some(request),
            pc: Pc::Idle,
            generation: 0,
            token: 0,
            takes: 2,
        };
        let completer = Holder {
            request: None,
            takes: 1,
            ..client(0)
        };
        let mut state = State {
            row: None,
            answered: None,
            holders: vec![client(0), client(1), completer],
            charges: Vec::new(),
            standby: Replica {
                row: None,
                answered: None,
                charges: Vec::new(),
                generations: 0,
            },
            failovers: self.bounds.failovers,
            catch_ups: self.bounds.catch_ups,
            request_of: BTreeMap::new(),
            lost: None,
            calls: BTreeSet::new(),
            fenced_out_writes: 0,
            next_generation: 0,
            next_token: 0,
            expiries: self.bounds.expiries,
            frees: self.bounds.frees,
            forgets: self.bounds.forgets,
            windows: self.bounds.windows,
        };
        state.standby = state.replica();
        vec![state]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        for (h, holder) in state.holders.iter().enumerate() {
            match holder.pc {
                Pc::Idle if holder.takes > 0 => actions.push(Action::Take(h)),
                Pc::Idle | Pc::Done => {}
                // Standby confirmation: the call waits until the row is still the
                // holder's on the server and the standby has its creation, or gives up
                // (the wait ran out, or the lease was lost) and releases the request.
                // (Without failovers the model has no standby to wait for.)
                Pc::Call
                    if self.rules.confirm_before_call
                        && self.bounds.failovers > 0
                        && !(state
                            .row
                            .as_ref()
                            .is_some_and(|row| row.token == holder.token)
                            && state.standby.generations >= holder.generation) =>
                {
                    actions.push(Action::GiveUp(h));
                }
                _ => actions.push(Action::Step(h)),
            }
        }
        if state.catch_ups > 0 && state.standby != state.replica() {
            actions.push(Action::StandbyCatchesUp);
        }
        if state.failovers > 0 {
            actions.push(Action::Failover);
        }
        if let Some(row) = &state.row {
            if row.leased && state.expiries > 0 {
                actions.push(Action::LeaseRunsOut);
            }
            if !row.leased && row.resume_at == Pc::Start && state.frees > 0 {
                actions.push(Action::CompleterFrees);
            }
        }
        if state.forgets > 0 && (state.row.is_some() || state.answered.is_some()) {
            actions.push(Action::Forget);
        }
        if state.windows > 0 && (state.row.is_some() || state.answered.is_some()) {
            actions.push(Action::WindowEnds);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Take(h) => {
                state.holders[h].takes -= 1;
                let request = state.holders[h].request;
                if state.answered.is_some() {
                    // A replay (or a conflict): nothing more to do.
                    state.holders[h].pc = Pc::Done;
                    return Some(state);
                }
                match (&state.row, request) {
                    // A new request: a new row, a new nonce, the first grant.
                    (None, Some(request)) => {
                        let token = self.token(&mut state, None);
                        state.next_generation += 1;
                        let generation = state.next_generation;
                        let serves = match state.lost {
                            Some((body, served)) if body == request => {
                                state.lost = None;
                                served
                            }
                            _ => generation,
                        };
                        state.request_of.insert(generation, serves);
                        state.row = Some(Row {
                            generation,
                            request,
                            token,
                            nonce: generation,
                            leased: true,
                            resume_at: Pc::Start,
                        });
                        let holder = &mut state.holders[h];
                        (holder.pc, holder.generation, holder.token) =
                            (Pc::Start, generation, token);
                    }
                    // Another body conflicts; a held request is busy (look again later).
                    (Some(row), Some(request)) if row.request != request => {
                        state.holders[h].pc = Pc::Done;
                    }
                    (Some(row), _) if row.leased => {}
                    // The completer takes only started requests.
                    (Some(row), None) if row.resume_at == Pc::Start => {}
                    // A takeover: a new grant on the same row; progress stays.
                    (Some(row), _) => {
                        let (previous, generation, resume_at) =
                            (row.token, row.generation, row.resume_at);
                        let token = self.token(&mut state, Some(previous));
                        let row = state.row.as_mut().expect("matched");
                        (row.token, row.leased) = (token, true);
                        let holder = &mut state.holders[h];
                        (holder.pc, holder.generation, holder.token) =
                            (resume_at, generation, token);
                    }
                    (None, None) => {}
                }
            }
            Action::Step(h) => {
                let pc = state.holders[h].pc;
                let next = match pc {
                    // The external call: outside the database, unfenced (a holder whose
                    // lease has more than half left does not renew before it).
                    Pc::Call => {
                        let holder = &state.holders[h];
                        let generation = holder.generation;
                        // The key is derived from the row as the holder took it.
                        let nonce = generation;
                        let key = if self.rules.keys_from_nonce { nonce } else { 0 };
                        state.calls.insert((generation, key));
                        Some(Pc::Record)
                    }
                    Pc::Finish => match fenced(&mut state, h) {
                        Some(_) => {
                            let generation = state.row.take().expect("fenced").generation;
                            state.answered = Some(generation);
                            Some(Pc::Done)
                        }
                        None => None,
                    },
                    _ => match fenced(&mut state, h) {
                        Some(row) => {
                            let (generation, next) = match pc {
                                Pc::Start => (None, Pc::Local),
                                Pc::Local => (Some(row.generation), Pc::Call),
                                _ => (None, Pc::Finish),
                            };
                            row.leased = true;
                            row.resume_at = next;
                            state.charges.extend(generation);
                            Some(next)
                        }
                        None => None,
                    },
                };
                // Fenced out: the holder ends with `LeaseLost`, and its client may retry.
                let holder = &mut state.holders[h];
                holder.pc = next.unwrap_or(if holder.takes > 0 { Pc::Idle } else { Pc::Done });
            }
            Action::LeaseRunsOut => {
                state.expiries -= 1;
                state.row.as_mut().expect("enabled").leased = false;
            }
            Action::CompleterFrees => {
                state.frees -= 1;
                state.row = None;
            }
            Action::Forget => {
                state.forgets -= 1;
                (state.row, state.answered) = (None, None);
            }
            Action::WindowEnds => {
                // Both rows count as gone (a new request replaces them), and the sweep
                // deletes them.
                state.windows -= 1;
                (state.row, state.answered) = (None, None);
            }
            Action::StandbyCatchesUp => {
                state.catch_ups -= 1;
                state.standby = state.replica();
            }
            Action::GiveUp(h) => {
                if let Some(row) = fenced(&mut state, h) {
                    row.leased = false;
                }
                let holder = &mut state.holders[h];
                holder.pc = if holder.takes > 0 { Pc::Idle } else { Pc::Done };
            }
            Action::Failover => {
                // The standby's copy becomes the database; a row it lacks is lost, and
                // its client's retry serves the same request. The processor forgets
                // nothing.
                state.failovers -= 1;
                let standby = state.standby.clone();
                if let Some(row) = state.row.take()
                    && standby
                        .row
                        .as_ref()
                        .is_none_or(|kept| kept.generation != row.generation)
                {
                    state.lost = Some((row.request, state.request_of[&row.generation]));
                }
                (state.row, state.answered, state.charges) =
                    (standby.row, standby.answered, standby.charges);
                state.standby = state.replica();
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::<Self>::always("no write by a holder fenced out", |_, state| {
                state.fenced_out_writes == 0
            }),
            Property::<Self>::always("one business effect per request", |_, state| {
                let mut seen = BTreeSet::new();
                state
                    .charges
                    .iter()
                    .all(|generation| seen.insert(state.request_of[generation]))
            }),
            Property::<Self>::always("one downstream key per request", |_, state| {
                // Every request sends one key, and no key is sent by two requests.
                let mut keys_of: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
                let mut requests_of: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
                for &(generation, key) in &state.calls {
                    let request = state.request_of[&generation];
                    keys_of.entry(request).or_default().insert(key);
                    requests_of.entry(key).or_default().insert(request);
                }
                keys_of.values().all(|keys| keys.len() == 1)
                    && requests_of.values().all(|requests| requests.len() == 1)
            }),
            Property::<Self>::eventually("no key stuck", |_, state| {
                // Answered, free, or takeable by a retry or the completer.
                state.answered.is_some() || state.row.as_ref().is_none_or(|row| !row.leased)
            }),
            Property::<Self>::sometimes("a request can be answered", |_, state| {
                state.answered.is_some()
            }),
        ]
    }
}

fn check(rules: Rules) -> impl Checker<PhasedModel> {
    check_within(rules, Bounds::NO_FAILOVER)
}

fn check_within(rules: Rules, bounds: Bounds) -> impl Checker<PhasedModel> {
    PhasedModel { rules, bounds }.checker().spawn_bfs().join()
}

/// The steps of `path` up to the first state where `property` fails, and that state.
fn trace(model: &PhasedModel, path: Path<State, Action>, property: &str) -> String {
    let condition = model
        .properties()
        .into_iter()
        .find(|candidate| candidate.name == property)
        .expect("a property of the model")
        .condition;
    let mut steps = Vec::new();
    for (state, action) in path.into_vec() {
        if !condition(model, &state) {
            return format!(
                "{}
  then: {state:?}",
                steps.join(" -> ")
            );
        }
        steps.extend(action.map(|action| format!("{action:?}")));
    }
    panic!("the path never breaks '{property}'")
}

#[test]
fn the_protocol_keeps_its_properties_in_every_interleaving() {
    let checker = check(Rules::CURRENT);
    checker.assert_properties();
    println!("{} states checked", checker.unique_state_count());
    assert!(checker.unique_state_count() > 1_000, "the model hardly ran");
}

#[test]
fn the_former_rules_fail_and_the_checker_says_how() {
    let checker = check(Rules::BEFORE);
    for property in [
        "no write by a holder fenced out",
        "one business effect per request",
        "one downstream key per request",
    ] {
        let path = checker
            .discovery(property)
            .unwrap_or_else(|| panic!("no counterexample to '{property}' under the former rules"));
        let trace = trace(checker.model(), path, property);
        println!("counterexample to '{property}':\n  {trace}\n");
    }
    // Each fault alone breaks its own property.
    let tokens_only = check(Rules {
        fresh_tokens: false,
        ..Rules::CURRENT
    });
    assert!(
        tokens_only
            .discovery("no write by a holder fenced out")
            .is_some()
    );
    assert!(
        tokens_only
            .discovery("one downstream key per request")
            .is_none()
    );
    let keys_only = check(Rules {
        keys_from_nonce: false,
        ..Rules::CURRENT
    });
    assert!(
        keys_only
            .discovery("one downstream key per request")
            .is_some()
    );
    assert!(
        keys_only
            .discovery("no write by a holder fenced out")
            .is_none()
    );
}

#[test]
fn through_a_failover_the_protocol_keeps_its_properties() {
    let checker = check_within(Rules::CURRENT, Bounds::FAILOVER);
    checker.assert_properties();
    println!("{} states checked", checker.unique_state_count());
    assert!(checker.unique_state_count() > 1_000, "the model hardly ran");
}

#[test]
fn without_standby_confirmation_a_failover_charges_twice() {
    let checker = check_within(Rules::UNCONFIRMED, Bounds::FAILOVER);
    let property = "one downstream key per request";
    let path = checker
        .discovery(property)
        .expect("no counterexample without standby confirmation");
    let trace = trace(checker.model(), path, property);
    println!("counterexample to '{property}':\n  {trace}\n");
    assert!(trace.contains("Failover"), "{trace}");
    for kept in [
        "no write by a holder fenced out",
        "one business effect per request",
    ] {
        assert!(checker.discovery(kept).is_none(), "{kept}");
    }
}
