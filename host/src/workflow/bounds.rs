//! Bounds on one template evaluation: whatever a template says, it ends in
//! bounded time and memory, or fails with kind `template_limit`.
//!
//! Templates run on the executor's threads, outside any sandbox, and anyone
//! allowed to upload a workflow writes them. MiniJinja bounds the
//! instructions one evaluation runs (fuel) and caps a few things (a string
//! repeated past 100 MB, a range past 100,000 items), but one instruction can
//! still do unbounded work:
//!
//! - `[] * 10**17` is a lazy list of 10^17 items that printing walks one by
//!   one (`{{ 677729 * [] * 81511111729 }}` held a worker for good);
//! - `x + x`, repeated, doubles a list per instruction without allocating it,
//!   and `[x, x]` nested 60 deep is a value of 2^60 leaves that `==`,
//!   `tojson`, a map key or printing walk in full;
//! - `s ~ s` doubles a string per instruction (one `[output]` template grew
//!   `trellis run` past 8 GiB in 40 seconds);
//! - `'%09999999999d' | format(1)` allocates the width it is given.
//!
//! So, before an evaluation runs, its compiled instructions are rewritten
//! ([`rewrite`]): every instruction that can take more than constant time or
//! build a bigger value calls a function of this module instead, which
//! weighs its operands, charges the evaluation's budget and refuses what is
//! over a bound, then does what the instruction did (by MiniJinja's own code
//! where it is not public: [`delegate`]). Every filter, test and global
//! function is wrapped the same way ([`install`]), and so is printing. The
//! bounds ([`Bound`]):
//!
//! - a value weighs at most [`MAX_VALUE`] (about its size printed, a value
//!   held twice counted twice), so no instruction walks more than that;
//! - one evaluation weighs, builds and prints at most [`MAX_WORK`] in all,
//!   so time and memory are bounded whatever the loops;
//! - one evaluation prints at most [`MAX_OUTPUT`];
//! - MiniJinja's fuel: [`MAX_INSTRUCTIONS`].
//!
//! What cannot be rewritten one for one is refused when the template is
//! compiled: chained comparisons (`a < b < c`), `*` unpacking, and
//! `include`/`import`/`extends`/blocks, which workflow templates have no use
//! for.

use std::cell::Cell;
use std::fmt;
use std::sync::LazyLock;

use minijinja::machinery::{Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, UndefinedBehavior, context};

/// The most one value may weigh: 64 MiB, four times a step's default
/// `max_output`, so a step's whole output can be passed on; at [`NODE`] a
/// value, about 100 MiB of MiniJinja values at most.
pub(crate) const MAX_VALUE: u64 = 64 << 20;
/// The most one evaluation may weigh, build and print in all: a second or
/// two of walking values, at worst.
pub(crate) const MAX_WORK: u64 = 1 << 30;
/// The most text one evaluation may print.
pub(crate) const MAX_OUTPUT: u64 = 64 << 20;
/// Instructions one evaluation may run: plenty for data shaping.
pub(crate) const MAX_INSTRUCTIONS: u64 = 5_000_000;
/// The largest width or precision a `format` string may ask for, and the
/// largest size `slice`, `batch`, `indent` and `tojson` take.
pub(crate) const MAX_FILTER_SIZE: usize = 10_000;

/// Weight of a value besides the bytes of its strings: about what one
/// MiniJinja value takes in memory.
const NODE: u64 = 16;

/// A bound a template went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `MAX_VALUE`.
    Value,
    /// `MAX_WORK`.
    Work,
    /// `MAX_OUTPUT`.
    Output,
    /// `MAX_INSTRUCTIONS`.
    Instructions,
    /// `MAX_FILTER_SIZE`.
    FilterSize,
    /// MiniJinja's own cap on `range`.
    Range,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Value => write!(f, "the bound on one value ({} MiB)", MAX_VALUE >> 20),
            Bound::Work => write!(
                f,
                "the bound on the work of one evaluation ({} MiB weighed, built and printed)",
                MAX_WORK >> 20
            ),
            Bound::Output => write!(
                f,
                "the bound on the text one evaluation prints ({} MiB)",
                MAX_OUTPUT >> 20
            ),
            Bound::Instructions => write!(
                f,
                "the bound on the instructions of one evaluation ({MAX_INSTRUCTIONS})"
            ),
            Bound::FilterSize => {
                write!(f, "the bound on sizes given to filters ({MAX_FILTER_SIZE})")
            }
            Bound::Range => write!(f, "the bound on a range (100000 items)"),
        }
    }
}

/// What one evaluation has left, and the bound it went over, if any.
#[derive(Clone, Copy)]
struct Budget {
    work: u64,
    output: u64,
    over: Option<Bound>,
}

const FULL: Budget = Budget {
    work: MAX_WORK,
    output: MAX_OUTPUT,
    over: None,
};

thread_local! {
    static BUDGET: Cell<Budget> = const { Cell::new(FULL) };
}

/// Runs one evaluation with a full budget; gives the bound it went over, if
/// it failed on one. Evaluations run on one thread from start to end.
pub(crate) fn evaluate<T>(run: impl FnOnce() -> T) -> (T, Option<Bound>) {
    let before = BUDGET.with(|budget| budget.replace(FULL));
    let result = run();
    let after = BUDGET.with(|budget| budget.replace(before));
    (result, after.over)
}

/// A `template_limit` error: remembered for [`evaluate`], whatever MiniJinja
/// makes of the error on its way out.
fn over(bound: Bound, what: impl fmt::Display) -> Error {
    over_with(bound, format!("{what} is over {bound}"))
}

/// [`over`] with the whole message.
fn over_with(bound: Bound, message: String) -> Error {
    BUDGET.with(|budget| {
        let mut now = budget.get();
        now.over.get_or_insert(bound);
        budget.set(now);
    });
    Error::new(ErrorKind::InvalidOperation, message)
}

/// Marks an error MiniJinja raised itself on one of its own bounds (fuel, a
/// range) as `template_limit`.
pub(crate) fn bound_of(error: &Error) -> Option<Bound> {
    match error.kind() {
        ErrorKind::OutOfFuel => Some(Bound::Instructions),
        ErrorKind::InvalidOperation
            if error
                .detail()
                .is_some_and(|detail| detail.contains("range has too many elements")) =>
        {
            Some(Bound::Range)
        }
        _ => None,
    }
}

fn charge_work(amount: u64, what: &str) -> Result<(), Error> {
    let left = BUDGET.with(|budget| {
        let mut now = budget.get();
        let left = now.work.checked_sub(amount);
        now.work = left.unwrap_or(0);
        budget.set(now);
        left
    });
    match left {
        Some(_) => Ok(()),
        None => Err(over(Bound::Work, what)),
    }
}

/// Charges `bytes` of printed text.
pub(crate) fn charge_output(bytes: usize) -> Result<(), Error> {
    let bytes = bytes as u64;
    let left = BUDGET.with(|budget| {
        let mut now = budget.get();
        let left = now.output.checked_sub(bytes);
        now.output = left.unwrap_or(0);
        budget.set(now);
        left
    });
    if left.is_none() {
        return Err(over(Bound::Output, "the text printed"));
    }
    charge_work(bytes, "the text printed")
}

/// What `value` weighs: the bytes of its strings plus [`NODE`] for every
/// value in it, a value held twice counted twice (that is what printing it
/// or comparing it costs). Stops as soon as the weight passes `cap`, so it
/// takes at most that long whatever the value; the walk is charged to the
/// evaluation's work.
pub(crate) fn weigh(value: &Value, cap: u64, what: &str) -> Result<u64, Error> {
    let mut total = 0u64;
    let mut add = |amount: u64| -> Result<(), Error> {
        total = total.saturating_add(amount);
        if total > cap {
            return Err(over(Bound::Value, what));
        }
        Ok(())
    };
    let mut stack = vec![value.clone()];
    while let Some(value) = stack.pop() {
        add(NODE)?;
        match value.kind() {
            ValueKind::String => add(value.as_str().map_or(0, str::len) as u64)?,
            ValueKind::Bytes => add(value.as_bytes().map_or(0, <[u8]>::len) as u64)?,
            ValueKind::Seq | ValueKind::Iterable => {
                let Ok(items) = value.try_iter() else {
                    continue;
                };
                for item in items {
                    add(NODE)?;
                    if needs_walk(&item) {
                        stack.push(item);
                    } else {
                        add(flat_weight(&item))?;
                    }
                }
            }
            ValueKind::Map => {
                let Ok(keys) = value.try_iter() else { continue };
                for key in keys {
                    let item = value.get_item(&key).unwrap_or_default();
                    for part in [key, item] {
                        if needs_walk(&part) {
                            stack.push(part);
                        } else {
                            add(NODE + flat_weight(&part))?;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    charge_work(total, what)?;
    Ok(total)
}

fn needs_walk(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map
    )
}

fn flat_weight(value: &Value) -> u64 {
    match value.kind() {
        ValueKind::String => value.as_str().map_or(0, str::len) as u64,
        ValueKind::Bytes => value.as_bytes().map_or(0, <[u8]>::len) as u64,
        _ => 0,
    }
}

/// Weighs every argument, each against [`MAX_VALUE`]; their sum.
fn weigh_all(args: &[Value], what: &str) -> Result<u64, Error> {
    let mut sum = 0u64;
    for arg in args {
        sum = sum.saturating_add(weigh(arg, MAX_VALUE, what)?);
    }
    Ok(sum)
}

fn at_most(weight: u64, what: &str) -> Result<(), Error> {
    if weight > MAX_VALUE {
        return Err(over(Bound::Value, what));
    }
    Ok(())
}

fn is_text(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::String | ValueKind::Bytes)
}

fn is_sequence(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable)
}

fn is_scalar(value: &Value) -> bool {
    !needs_walk(value) && !is_text(value)
}

// ---------------------------------------------------------------------------
// The operators, done by MiniJinja's own code once they are known to be small.

/// The binary operators whose code is not public in MiniJinja: each one is
/// an expression of `a` and `b`, compiled once in a plain environment.
#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Mul,
    Concat,
    In,
    Slice,
}

static DELEGATE: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::empty();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
});

/// Does `op` as MiniJinja does it.
fn delegate(op: Op, args: &[Value]) -> Result<Value, Error> {
    thread_local! {
        static EXPRESSIONS: [minijinja::Expression<'static, 'static>; 5] = [
            DELEGATE.compile_expression("a + b").expect("compiles"),
            DELEGATE.compile_expression("a * b").expect("compiles"),
            DELEGATE.compile_expression("a ~ b").expect("compiles"),
            DELEGATE.compile_expression("a in b").expect("compiles"),
            DELEGATE.compile_expression("a[b:c:d]").expect("compiles"),
        ];
    }
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let scope = context! { a => arg(0), b => arg(1), c => arg(2), d => arg(3) };
    EXPRESSIONS.with(|expressions| expressions[op as usize].eval(scope))
}

fn strict(value: &Value) -> Result<(), Error> {
    if value.is_undefined() {
        return Err(Error::from(ErrorKind::UndefinedError));
    }
    Ok(())
}

fn op_add(a: Value, b: Value) -> Result<Value, Error> {
    if !(is_scalar(&a) && is_scalar(&b)) {
        let weight = weigh_all(&[a.clone(), b.clone()], "a value `+` builds")?;
        at_most(weight, "a value `+` builds")?;
        charge_work(weight, "a value `+` builds")?;
    }
    delegate(Op::Add, &[a, b])
}

fn op_mul(a: Value, b: Value) -> Result<Value, Error> {
    let repeated = match (is_scalar(&a), is_scalar(&b)) {
        (true, true) => None,
        (false, true) => Some((&a, &b)),
        (true, false) => Some((&b, &a)),
        (false, false) => None,
    };
    if let Some((value, times)) = repeated
        && (is_text(value) || is_sequence(value))
    {
        let times = times.as_i64().unwrap_or(0).max(0) as u64;
        // A string repeated is one string; a list repeated repeats its items.
        let weight = if is_text(value) {
            NODE + flat_weight(value).saturating_mul(times)
        } else {
            weigh(value, MAX_VALUE, "a value `*` repeats")?.saturating_mul(times)
        };
        at_most(weight, "a value `*` builds")?;
        charge_work(weight, "a value `*` builds")?;
    }
    delegate(Op::Mul, &[a, b])
}

fn op_concat(a: Value, b: Value) -> Result<Value, Error> {
    let weight = weigh_all(&[a.clone(), b.clone()], "a string `~` builds")?;
    at_most(weight, "a string `~` builds")?;
    charge_work(weight, "a string `~` builds")?;
    delegate(Op::Concat, &[a, b])
}

fn op_in(needle: Value, container: Value) -> Result<Value, Error> {
    weigh_all(
        &[needle.clone(), container.clone()],
        "a value `in` compares",
    )?;
    delegate(Op::In, &[needle, container])
}

fn op_slice(value: Value, start: Value, stop: Value, step: Value) -> Result<Value, Error> {
    if !is_text(&value) {
        weigh(&value, MAX_VALUE, "a value sliced")?;
    }
    delegate(Op::Slice, &[value, start, stop, step])
}

fn compare(a: Value, b: Value, test: impl FnOnce(&Value, &Value) -> bool) -> Result<Value, Error> {
    strict(&a)?;
    strict(&b)?;
    if !(is_scalar(&a) && is_scalar(&b)) {
        weigh_all(&[a.clone(), b.clone()], "a value compared")?;
    }
    Ok(Value::from(test(&a, &b)))
}

fn get_item(container: Value, key: Value) -> Result<Value, Error> {
    if needs_walk(&key) {
        weigh(&key, MAX_VALUE, "a key")?;
    }
    // Undefined when missing; an error when `container` is itself
    // undefined: the instruction's strict-mode behaviour.
    container.get_item(&key)
}

fn build_list(items: Rest<Value>) -> Result<Value, Error> {
    let weight = weigh_all(&items, "a list")?;
    at_most(weight, "a list")?;
    Ok(Value::from(items.0))
}

fn build_map(pairs: Rest<Value>) -> Result<Value, Error> {
    let weight = weigh_all(&pairs, "a map")?;
    at_most(weight, "a map")?;
    let mut entries = Vec::with_capacity(pairs.len() / 2);
    let mut iter = pairs.0.into_iter();
    while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
        entries.push((key, value));
    }
    Ok(Value::from_iter(entries))
}

// ---------------------------------------------------------------------------
// Rewriting the instructions.

const ADD: &str = "__trellis_add";
const MUL: &str = "__trellis_mul";
const CONCAT: &str = "__trellis_concat";
const IN: &str = "__trellis_in";
const SLICE: &str = "__trellis_slice";
const GET_ITEM: &str = "__trellis_get_item";
const LIST: &str = "__trellis_list";
const MAP: &str = "__trellis_map";
const EQ: &str = "__trellis_eq";
const NE: &str = "__trellis_ne";
const LT: &str = "__trellis_lt";
const LTE: &str = "__trellis_lte";
const GT: &str = "__trellis_gt";
const GTE: &str = "__trellis_gte";
/// `loop.changed(x)` compares `x` with what it was given last time, and
/// `loop.cycle(...)` hands one back: both go through [`call_method`].
const METHODS: [(&str, &str); 2] = [
    ("changed", "__trellis_method_changed"),
    ("cycle", "__trellis_method_cycle"),
];

/// The prefix of the names this module gives its functions; templates may
/// not use it.
pub(crate) const RESERVED_PREFIX: &str = "__trellis_";

/// Why a template cannot be evaluated within the bounds, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub message: String,
    /// Byte range in the template's source.
    pub range: Option<std::ops::Range<usize>>,
}

/// Refuses what [`rewrite`] cannot bound.
pub(crate) fn check(instructions: &Instructions<'_>) -> Result<(), Refused> {
    for at in 0..instructions.len() as u32 {
        let refused = match instructions.get(at) {
            Some(Instruction::CompareAndPreserve(_)) => {
                "chained comparisons (`a < b < c`) are not supported in workflow templates; \
                 write `a < b and b < c`"
            }
            Some(Instruction::UnpackLists(_) | Instruction::BuildList(None)) => {
                "`*` unpacking is not supported in workflow templates"
            }
            Some(
                Instruction::Include(_)
                | Instruction::LoadBlocks
                | Instruction::CallBlock(_)
                | Instruction::FastSuper
                | Instruction::ExportLocals,
            ) => {
                "`include`, `import`, `extends` and blocks are not supported in workflow templates"
            }
            Some(Instruction::BuildList(Some(n))) if *n > usize::from(u16::MAX) => {
                "a list literal of more than 65535 items is too long"
            }
            Some(Instruction::BuildMap(n)) if n.saturating_mul(2) > usize::from(u16::MAX) => {
                "a map literal of more than 32767 entries is too long"
            }
            _ => continue,
        };
        let range = instructions
            .get_span(at)
            .map(|span| span.start_offset as usize..span.end_offset as usize);
        return Err(Refused {
            message: refused.to_owned(),
            range,
        });
    }
    Ok(())
}

/// `instructions` with every instruction that can take more than constant
/// time calling this module instead. Jump targets are moved with the code.
/// Templates that [`check`] refuses are not rewritten whole: check first.
pub(crate) fn rewrite<'s>(instructions: &Instructions<'s>) -> Instructions<'s> {
    let call = |name: &'s str, args: usize| {
        Instruction::CallFunction(name, Some(u16::try_from(args).unwrap_or(u16::MAX)))
    };
    let len = instructions.len() as u32;
    // Where each old instruction starts in the new code.
    let mut starts = Vec::with_capacity(len as usize + 1);
    let mut code: Vec<(Vec<Instruction<'s>>, u32)> = Vec::with_capacity(len as usize);
    let mut at_new = 0u32;
    for at in 0..len {
        starts.push(at_new);
        let Some(instruction) = instructions.get(at) else {
            break;
        };
        let replaced = match instruction {
            Instruction::Add => vec![call(ADD, 2)],
            Instruction::Mul => vec![call(MUL, 2)],
            Instruction::StringConcat => vec![call(CONCAT, 2)],
            Instruction::In => vec![call(IN, 2)],
            Instruction::Slice => vec![call(SLICE, 4)],
            Instruction::GetItem => vec![call(GET_ITEM, 2)],
            Instruction::Eq => vec![call(EQ, 2)],
            Instruction::Ne => vec![call(NE, 2)],
            Instruction::Lt => vec![call(LT, 2)],
            Instruction::Lte => vec![call(LTE, 2)],
            Instruction::Gt => vec![call(GT, 2)],
            Instruction::Gte => vec![call(GTE, 2)],
            Instruction::BuildList(Some(n)) => vec![call(LIST, *n)],
            Instruction::BuildMap(n) => vec![call(MAP, n * 2)],
            Instruction::CallMethod(name, count) => match METHODS.iter().find(|m| m.0 == *name) {
                Some((_, function)) => vec![Instruction::CallFunction(function, *count)],
                None => vec![instruction.clone()],
            },
            // Printed through the formatter, which counts what is printed.
            Instruction::EmitRaw(text) => {
                vec![
                    Instruction::LoadConst(Value::from(*text)),
                    Instruction::Emit,
                ]
            }
            other => vec![other.clone()],
        };
        at_new += replaced.len() as u32;
        code.push((replaced, at));
    }
    starts.push(at_new);
    let moved = |target: u32| starts.get(target as usize).copied().unwrap_or(at_new);
    let mut out = Instructions::new(instructions.name(), instructions.source());
    for (replaced, at) in code {
        let span = instructions.get_span(at);
        let line = instructions.get_line(at);
        for instruction in replaced {
            let instruction = match instruction {
                Instruction::Jump(to) => Instruction::Jump(moved(to)),
                Instruction::JumpIfFalse(to) => Instruction::JumpIfFalse(moved(to)),
                Instruction::JumpIfFalseOrPop(to) => Instruction::JumpIfFalseOrPop(moved(to)),
                Instruction::JumpIfTrueOrPop(to) => Instruction::JumpIfTrueOrPop(moved(to)),
                Instruction::Iterate(to) => Instruction::Iterate(moved(to)),
                Instruction::BuildMacro(name, to, flags) => {
                    Instruction::BuildMacro(name, moved(to), flags)
                }
                other => other,
            };
            match (span, line) {
                (Some(span), _) => out.add_with_span(instruction, span),
                (None, Some(line)) => out.add_with_line(instruction, line as u16),
                (None, None) => out.add(instruction),
            };
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The environment: the operators' functions, and every filter, test and
// global function wrapped.

/// Registers what [`rewrite`]'s code calls and wraps every filter, test and
/// global function of `env` so that their arguments are weighed first.
pub(crate) fn install(env: &mut Environment<'static>) {
    env.set_fuel(Some(MAX_INSTRUCTIONS));
    env.add_function(ADD, op_add);
    env.add_function(MUL, op_mul);
    env.add_function(CONCAT, op_concat);
    env.add_function(IN, op_in);
    env.add_function(SLICE, op_slice);
    env.add_function(GET_ITEM, get_item);
    env.add_function(LIST, build_list);
    env.add_function(MAP, build_map);
    env.add_function(EQ, |a, b| compare(a, b, |a, b| a == b));
    env.add_function(NE, |a, b| compare(a, b, |a, b| a != b));
    env.add_function(LT, |a, b| compare(a, b, |a, b| a < b));
    env.add_function(LTE, |a, b| compare(a, b, |a, b| a <= b));
    env.add_function(GT, |a, b| compare(a, b, |a, b| a > b));
    env.add_function(GTE, |a, b| compare(a, b, |a, b| a >= b));
    for (method, function) in METHODS {
        env.add_function(function, move |state: &State, args: Rest<Value>| {
            weigh_all(&args[1.min(args.len())..], "a value passed to a method")?;
            match args.split_first() {
                Some((object, rest)) => object.call_method(state, method, rest),
                None => Err(Error::from(ErrorKind::MissingArgument)),
            }
        });
    }

    use minijinja::filters as f;
    // A check gets the filter's name, its arguments and their weight (0
    // for a filter that does not walk them).
    type Check = fn(&str, &[Value], u64) -> Result<(), Error>;
    let no_check: Check = |_, _, _| Ok(());
    // Filters that look at their value's length or items only.
    let shallow = [
        ("safe", Value::from_function(f::safe)),
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("items", Value::from_function(f::items)),
        ("reverse", Value::from_function(f::reverse)),
        ("trim", Value::from_function(f::trim)),
        ("split", Value::from_function(f::split)),
        ("lines", Value::from_function(f::lines)),
        ("default", Value::from_function(f::default)),
        ("d", Value::from_function(f::default)),
        ("round", Value::from_function(f::round)),
        ("abs", Value::from_function(f::abs)),
        ("int", Value::from_function(f::int)),
        ("float", Value::from_function(f::float)),
        ("attr", Value::from_function(f::attr)),
        ("first", Value::from_function(f::first)),
        ("last", Value::from_function(f::last)),
        ("list", Value::from_function(f::list)),
        ("bool", Value::from_function(f::bool)),
        ("sum", Value::from_function(f::sum)),
        ("select", Value::from_function(f::select)),
        ("reject", Value::from_function(f::reject)),
        ("selectattr", Value::from_function(f::selectattr)),
        ("rejectattr", Value::from_function(f::rejectattr)),
        ("map", Value::from_function(f::map)),
        ("chain", Value::from_function(f::chain)),
        ("zip", Value::from_function(f::zip)),
    ];
    // Filters that print, compare or serialise their arguments whole, and
    // those that can make more than they are given, each group with its check.
    type Group = (Walk, Check, Vec<(&'static str, Value)>);
    let groups: Vec<Group> = vec![
        (
            Walk::Deep,
            no_check,
            vec![("string", Value::from_function(f::string))],
        ),
        (
            Walk::Deep,
            grows_6x,
            vec![
                ("escape", Value::from_function(f::escape)),
                ("e", Value::from_function(f::escape)),
                ("lower", Value::from_function(f::lower)),
                ("upper", Value::from_function(f::upper)),
                ("title", Value::from_function(f::title)),
                ("capitalize", Value::from_function(f::capitalize)),
            ],
        ),
        (
            Walk::Deep,
            check_replace,
            vec![("replace", Value::from_function(f::replace))],
        ),
        (
            Walk::Deep,
            check_sorting,
            vec![
                ("dictsort", Value::from_function(f::dictsort)),
                ("min", Value::from_function(f::min)),
                ("max", Value::from_function(f::max)),
                ("sort", Value::from_function(f::sort)),
                ("groupby", Value::from_function(f::groupby)),
                ("unique", Value::from_function(f::unique)),
            ],
        ),
        (
            Walk::Deep,
            check_join,
            vec![("join", Value::from_function(f::join))],
        ),
        (
            Walk::Shallow,
            check_fill,
            vec![
                ("batch", Value::from_function(f::batch)),
                ("slice", Value::from_function(f::slice)),
            ],
        ),
        (
            Walk::Deep,
            check_indent,
            vec![("indent", Value::from_function(f::indent))],
        ),
        (
            Walk::Deep,
            check_pretty,
            vec![("pprint", Value::from_function(f::pprint))],
        ),
        (
            Walk::Deep,
            check_format,
            vec![("format", Value::from_function(f::format))],
        ),
        (
            Walk::Deep,
            check_tojson,
            vec![("tojson", Value::from_function(f::tojson))],
        ),
    ];
    let filters = shallow
        .into_iter()
        .map(|(name, filter)| (name, filter, Walk::Shallow, no_check))
        .chain(groups.into_iter().flat_map(|(walk, check, filters)| {
            filters
                .into_iter()
                .map(move |(name, filter)| (name, filter, walk, check))
        }));
    for (name, filter, walk, check) in filters {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            let weight = match walk {
                Walk::Deep => weigh_all(&args, "a value filtered")?,
                Walk::Shallow => 0,
            };
            check(name, &args, weight)?;
            filter.call(state, &args)
        });
    }

    use minijinja::tests as t;
    let tests: [(&'static str, Value); 38] = [
        ("undefined", Value::from_function(t::is_undefined)),
        ("defined", Value::from_function(t::is_defined)),
        ("none", Value::from_function(t::is_none)),
        ("safe", Value::from_function(t::is_safe)),
        ("escaped", Value::from_function(t::is_safe)),
        ("boolean", Value::from_function(t::is_boolean)),
        ("odd", Value::from_function(t::is_odd)),
        ("even", Value::from_function(t::is_even)),
        ("divisibleby", Value::from_function(t::is_divisibleby)),
        ("number", Value::from_function(t::is_number)),
        ("integer", Value::from_function(t::is_integer)),
        ("int", Value::from_function(t::is_integer)),
        ("float", Value::from_function(t::is_float)),
        ("string", Value::from_function(t::is_string)),
        ("sequence", Value::from_function(t::is_sequence)),
        ("iterable", Value::from_function(t::is_iterable)),
        ("mapping", Value::from_function(t::is_mapping)),
        ("startingwith", Value::from_function(t::is_startingwith)),
        ("endingwith", Value::from_function(t::is_endingwith)),
        ("lower", Value::from_function(t::is_lower)),
        ("upper", Value::from_function(t::is_upper)),
        ("sameas", Value::from_function(t::is_sameas)),
        ("eq", Value::from_function(t::is_eq)),
        ("equalto", Value::from_function(t::is_eq)),
        ("==", Value::from_function(t::is_eq)),
        ("ne", Value::from_function(t::is_ne)),
        ("!=", Value::from_function(t::is_ne)),
        ("lt", Value::from_function(t::is_lt)),
        ("lessthan", Value::from_function(t::is_lt)),
        ("<", Value::from_function(t::is_lt)),
        ("le", Value::from_function(t::is_le)),
        ("<=", Value::from_function(t::is_le)),
        ("gt", Value::from_function(t::is_gt)),
        ("greaterthan", Value::from_function(t::is_gt)),
        (">", Value::from_function(t::is_gt)),
        ("ge", Value::from_function(t::is_ge)),
        (">=", Value::from_function(t::is_ge)),
        ("in", Value::from_function(t::is_in)),
    ];
    let more: [(&'static str, Value); 4] = [
        ("true", Value::from_function(t::is_true)),
        ("false", Value::from_function(t::is_false)),
        ("filter", Value::from_function(t::is_filter)),
        ("test", Value::from_function(t::is_test)),
    ];
    for (name, test) in tests.into_iter().chain(more) {
        // Tests of kind or shape look at the value's top only.
        let compares = matches!(
            name,
            "eq" | "equalto"
                | "=="
                | "ne"
                | "!="
                | "lt"
                | "lessthan"
                | "<"
                | "le"
                | "<="
                | "gt"
                | "greaterthan"
                | ">"
                | "ge"
                | ">="
                | "in"
        );
        env.add_test(name, move |state: &State, args: Rest<Value>| {
            if compares {
                weigh_all(&args, "a value tested")?;
            }
            test.call(state, &args).map(|result| result.is_true())
        });
    }

    let globals: Vec<(String, Value)> = env
        .globals()
        .filter(|(_, value)| value.kind() == ValueKind::Plain)
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    for (name, function) in globals {
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        env.add_function(name, move |state: &State, args: Rest<Value>| {
            weigh_all(&args, "a value passed to a function")?;
            let result = function.call(state, &args)?;
            let weight = weigh(&result, MAX_VALUE, "a value a function returns")?;
            charge_work(weight, "a value a function returns")?;
            Ok::<_, Error>(result)
        });
    }
}

/// Whether a filter walks its arguments whole (prints, compares or
/// serialises them), so they are weighed first, or only looks at their
/// length or items (whose own walks are weighed where they happen).
#[derive(Clone, Copy)]
enum Walk {
    Deep,
    Shallow,
}

/// Filters whose text can grow a few times over (`escape` turns `"` into
/// `&#34;`, `upper` can lengthen some letters).
fn grows_6x(name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    let weight = args.first().map_or(0, flat_weight).saturating_mul(6);
    at_most(weight, &format!("the text `{name}` makes"))
}

/// Sorting compares each item with about log2(n) others, each comparison
/// walking both: charged as 16 more walks of the value.
fn check_sorting(name: &str, _args: &[Value], weight: u64) -> Result<(), Error> {
    charge_work(
        weight.saturating_mul(16),
        &format!("what `{name}` compares"),
    )
}

fn check_replace(_name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    let (Some(text), Some(from), Some(to)) = (
        args.first().and_then(Value::as_str),
        args.get(1).and_then(Value::as_str),
        args.get(2).and_then(Value::as_str),
    ) else {
        return Ok(());
    };
    let times = if from.is_empty() {
        text.chars().count() as u64 + 1
    } else {
        text.matches(from).count() as u64
    };
    let weight = (text.len() as u64).saturating_add(times.saturating_mul(to.len() as u64));
    at_most(weight, "the text `replace` makes")
}

fn check_join(_name: &str, args: &[Value], weight: u64) -> Result<(), Error> {
    let items = args.first().and_then(Value::len).unwrap_or(0) as u64;
    let separator = args.get(1).map_or(0, flat_weight);
    at_most(
        weight.saturating_add(items.saturating_mul(separator)),
        "the text `join` makes",
    )
}

/// `batch(n, fill_with)` and `slice(n, fill_with)`: at most `n` fills.
fn check_fill(name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    check_sizes(name, args)?;
    let size = args.get(1).and_then(Value::as_i64).unwrap_or(0).max(0) as u64;
    let fill = args.get(2).map_or(0, |fill| NODE + flat_weight(fill));
    at_most(
        size.saturating_mul(fill),
        &format!("what `{name}` fills in"),
    )
}

fn check_indent(name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    check_sizes(name, args)?;
    let text = args.first().and_then(Value::as_str).unwrap_or_default();
    let lines = text.bytes().filter(|&b| b == b'\n').count() as u64 + 1;
    let width = args
        .get(1)
        .and_then(|width| match width.as_str() {
            Some(text) => Some(text.len() as u64),
            None => width.as_i64().map(|n| n.max(0) as u64),
        })
        .unwrap_or(0);
    at_most(
        (text.len() as u64).saturating_add(lines.saturating_mul(width)),
        "the text `indent` makes",
    )
}

/// `tojson` and `pprint` indent every line by its depth: weigh with that.
fn check_pretty(_name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    pretty_weight(args.first().unwrap_or(&Value::UNDEFINED), 4)
}

fn check_tojson(name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    check_sizes(name, args)?;
    let indent = args
        .iter()
        .skip(1)
        .find_map(|arg| {
            if arg.is_kwargs() {
                arg.get_item(&Value::from("indent")).ok()
            } else {
                Some(arg.clone())
            }
        })
        .and_then(|indent| indent.as_i64())
        .unwrap_or(0)
        .max(0) as u64;
    pretty_weight(args.first().unwrap_or(&Value::UNDEFINED), indent)
}

fn pretty_weight(value: &Value, indent: u64) -> Result<(), Error> {
    if indent == 0 {
        return Ok(());
    }
    let mut total = 0u64;
    let mut stack = vec![(value.clone(), 0u64)];
    while let Some((value, depth)) = stack.pop() {
        total = total.saturating_add(depth.saturating_mul(indent) + 1);
        if total > MAX_VALUE {
            return Err(over(Bound::Value, "the indented text"));
        }
        if needs_walk(&value)
            && let Ok(items) = value.try_iter()
        {
            let is_map = value.kind() == ValueKind::Map;
            for item in items {
                let item = if is_map {
                    value.get_item(&item).unwrap_or_default()
                } else {
                    item
                };
                stack.push((item, depth + 1));
            }
        }
    }
    charge_work(total, "the indented text")
}

/// Refuses a call of filter `name` whose arguments after the first (the
/// value filtered), keyword arguments included, hold a number over
/// [`MAX_FILTER_SIZE`].
fn check_sizes(name: &str, args: &[Value]) -> Result<(), Error> {
    let too_big = |value: &Value| {
        value.kind() == ValueKind::Number
            && value.as_i64().is_none_or(|n| n > MAX_FILTER_SIZE as i64)
    };
    for arg in args.iter().skip(1) {
        let found = if arg.is_kwargs() {
            arg.try_iter()
                .into_iter()
                .flatten()
                .filter_map(|key| arg.get_item(&key).ok())
                .find(too_big)
        } else {
            Some(arg.clone()).filter(too_big)
        };
        if let Some(found) = found {
            return Err(over_with(
                Bound::FilterSize,
                format!("{name}: {found} is over the limit of {MAX_FILTER_SIZE}"),
            ));
        }
    }
    Ok(())
}

/// Refuses a printf-style `format` string (`%-8s`, `%(name)05.2f`), the
/// value filtered, whose width or precision is over [`MAX_FILTER_SIZE`], or
/// whose widths add up to more than one value may weigh.
fn check_format(_name: &str, args: &[Value], _weight: u64) -> Result<(), Error> {
    let Some(text) = args.first().and_then(Value::as_str) else {
        return Ok(());
    };
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut total = text.len() as u64;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        i += 1;
        if bytes.get(i) == Some(&b'%') {
            i += 1;
            continue;
        }
        if bytes.get(i) == Some(&b'(') {
            match bytes[i..].iter().position(|&b| b == b')') {
                Some(close) => i += close + 1,
                // Unclosed: MiniJinja refuses the string itself.
                None => return Ok(()),
            }
        }
        while matches!(bytes.get(i), Some(b'#' | b'0' | b'-' | b' ' | b'+')) {
            i += 1;
        }
        for part in ["width", "precision"] {
            if part == "precision" {
                if bytes.get(i) != Some(&b'.') {
                    break;
                }
                i += 1;
            }
            let start = i;
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            let digits = &text[start..i];
            if digits.is_empty() {
                continue;
            }
            match digits.parse::<usize>() {
                Ok(n) if n <= MAX_FILTER_SIZE => total += n as u64,
                _ => {
                    return Err(over_with(
                        Bound::FilterSize,
                        format!(
                            "format: a {part} of {digits} is over the limit of {MAX_FILTER_SIZE}"
                        ),
                    ));
                }
            }
        }
    }
    at_most(total, "the text `format` makes")
}

// ---------------------------------------------------------------------------
// Constant folding: MiniJinja evaluates an operator whose operands are all
// literals while it compiles the template, before any of the above runs
// (`677729 * [] * 81511111729` is folded into one lazy list of 10^17 items;
// `[] * 10**17 == [] * 10**17` would compare them while compiling). So the
// expressions it would fold are weighed first, from the syntax alone.

/// What a foldable expression would weigh, and its value if it is a number.
#[derive(Clone, Copy)]
struct Folded {
    weight: u64,
    number: Option<f64>,
    /// A string: repeating it repeats its bytes only.
    text: bool,
}

/// Refuses a template whose constant expressions, folded, would go over
/// [`MAX_VALUE`]. `text` that does not parse passes: compiling it reports that.
pub(crate) fn check_constants(text: &str) -> Result<(), Refused> {
    use minijinja::machinery::{WhitespaceConfig, parse};
    #[allow(clippy::default_constructed_unit_structs)]
    let Ok(template) = parse(
        text,
        "<template>",
        minijinja::syntax::SyntaxConfig::default(),
        WhitespaceConfig::default(),
    ) else {
        return Ok(());
    };
    let mut folder = Folder { refused: None };
    folder.stmt(&template);
    match folder.refused {
        Some(refused) => Err(refused),
        None => Ok(()),
    }
}

struct Folder {
    refused: Option<Refused>,
}

impl Folder {
    fn stmts(&mut self, stmts: &[minijinja::machinery::ast::Stmt<'_>]) {
        for stmt in stmts {
            self.stmt(stmt);
        }
    }

    fn stmt(&mut self, stmt: &minijinja::machinery::ast::Stmt<'_>) {
        use minijinja::machinery::ast::Stmt;
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::ForLoop(f) => {
                self.expr(&f.target);
                self.expr(&f.iter);
                if let Some(filter) = &f.filter_expr {
                    self.expr(filter);
                }
                self.stmts(&f.body);
                self.stmts(&f.else_body);
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body);
                self.stmts(&i.false_body);
            }
            Stmt::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.expr(target);
                    self.expr(value);
                }
                self.stmts(&w.body);
            }
            Stmt::Set(s) => {
                self.expr(&s.target);
                self.expr(&s.expr);
            }
            Stmt::SetBlock(s) => {
                if let Some(filter) = &s.filter {
                    self.expr(filter);
                }
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body);
            }
            Stmt::Block(b) => self.stmts(&b.body),
            Stmt::Macro(m) => {
                for default in &m.defaults {
                    self.expr(default);
                }
                self.stmts(&m.body);
            }
            Stmt::CallBlock(c) => {
                self.call(&c.call);
                for default in &c.macro_decl.defaults {
                    self.expr(default);
                }
                self.stmts(&c.macro_decl.body);
            }
            Stmt::Do(d) => self.call(&d.call),
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Import(i) => self.expr(&i.expr),
            Stmt::FromImport(f) => self.expr(&f.expr),
            _ => {}
        }
    }

    fn call(&mut self, call: &minijinja::machinery::ast::Call<'_>) {
        self.expr(&call.expr);
        self.args(&call.args);
    }

    fn args(&mut self, args: &[minijinja::machinery::ast::CallArg<'_>]) {
        use minijinja::machinery::ast::CallArg;
        for arg in args {
            match arg {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    /// Walks `expr`: an expression MiniJinja folds is weighed whole, the
    /// others are walked into.
    fn expr(&mut self, expr: &minijinja::machinery::ast::Expr<'_>) {
        use minijinja::machinery::ast::Expr;
        if self.refused.is_some() || self.fold(expr).is_some() {
            return;
        }
        match expr {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(part);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(e) = &i.false_expr {
                    self.expr(e);
                }
            }
            Expr::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.expr(e);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => {
                self.expr(&c.expr);
                self.args(&c.args);
            }
            Expr::List(l) => {
                for item in &l.items {
                    self.expr(item);
                }
            }
            Expr::Map(m) => {
                for item in m.keys.iter().chain(&m.values) {
                    self.expr(item);
                }
            }
        }
    }

    /// What `expr` weighs folded, if MiniJinja folds it (as its
    /// `Expr::as_const` does, without evaluating anything); records a
    /// refusal when a fold would go over [`MAX_VALUE`].
    fn fold(&mut self, expr: &minijinja::machinery::ast::Expr<'_>) -> Option<Folded> {
        use minijinja::machinery::ast::{BinOpKind, Expr, UnaryOpKind};
        let scalar = |number: Option<f64>| Folded {
            weight: NODE,
            number,
            text: false,
        };
        let folded = match expr {
            Expr::Const(c) => {
                let value = &c.value;
                let number = match value.kind() {
                    ValueKind::Number => value
                        .as_i64()
                        .map(|n| n as f64)
                        .or_else(|| f64::try_from(value.clone()).ok()),
                    _ => None,
                };
                Folded {
                    weight: NODE + flat_weight(value),
                    number,
                    text: value.kind() == ValueKind::String,
                }
            }
            // Folded only when every item is a literal.
            Expr::List(l) => {
                let mut weight = NODE;
                for item in &l.items {
                    let Expr::Const(_) = item else { return None };
                    weight += self.fold(item)?.weight;
                }
                Folded {
                    weight,
                    number: None,
                    text: false,
                }
            }
            Expr::Map(m) => {
                let mut weight = NODE;
                for item in m.keys.iter().chain(&m.values) {
                    let Expr::Const(_) = item else { return None };
                    weight += self.fold(item)?.weight;
                }
                Folded {
                    weight,
                    number: None,
                    text: false,
                }
            }
            Expr::UnaryOp(u) => {
                let inner = self.fold(&u.expr)?;
                match u.op {
                    UnaryOpKind::Not => scalar(None),
                    UnaryOpKind::Neg => scalar(inner.number.map(|n| -n)),
                }
            }
            Expr::Compare(c) => {
                let mut weight = self.fold(&c.expr)?.weight;
                for op in &c.ops {
                    weight = weight.saturating_add(self.fold(&op.expr)?.weight);
                }
                self.at_most(weight, expr)?;
                scalar(None)
            }
            Expr::BinOp(b) => {
                let left = self.fold(&b.left)?;
                let right = self.fold(&b.right)?;
                let both = left.weight.saturating_add(right.weight);
                match b.op {
                    BinOpKind::Mul => {
                        let (value, times) = match (left.number, right.number) {
                            (Some(a), Some(b)) => return Some(scalar(Some(a * b))),
                            (None, Some(n)) => (left, n),
                            (Some(n), None) => (right, n),
                            (None, None) => return Some(scalar(None)),
                        };
                        let repeated = if value.text {
                            value.weight - NODE
                        } else {
                            value.weight
                        };
                        let weight = (repeated as f64 * times.max(0.0)).min(u64::MAX as f64);
                        let weight = (weight as u64).saturating_add(NODE);
                        self.at_most(weight, expr)?;
                        Folded {
                            weight,
                            number: None,
                            text: value.text,
                        }
                    }
                    BinOpKind::Add | BinOpKind::Concat => {
                        self.at_most(both, expr)?;
                        let number = match (b.op, left.number, right.number) {
                            (BinOpKind::Add, Some(a), Some(b)) => Some(a + b),
                            _ => None,
                        };
                        Folded {
                            weight: both,
                            number,
                            text: matches!(b.op, BinOpKind::Concat) || (left.text && right.text),
                        }
                    }
                    BinOpKind::Sub => scalar(left.number.zip(right.number).map(|(a, b)| a - b)),
                    BinOpKind::Div | BinOpKind::FloorDiv => {
                        scalar(left.number.zip(right.number).map(|(a, b)| a / b))
                    }
                    BinOpKind::Pow => scalar(left.number.zip(right.number).map(|(a, b)| a.powf(b))),
                    BinOpKind::Rem => scalar(None),
                    BinOpKind::ScAnd | BinOpKind::ScOr => Folded {
                        weight: left.weight.max(right.weight),
                        number: None,
                        text: false,
                    },
                    // Comparisons and `in` walk both operands.
                    _ => {
                        self.at_most(both, expr)?;
                        scalar(None)
                    }
                }
            }
            _ => return None,
        };
        Some(folded)
    }

    fn at_most(&mut self, weight: u64, expr: &minijinja::machinery::ast::Expr<'_>) -> Option<()> {
        if weight <= MAX_VALUE {
            return Some(());
        }
        let span = expr.span();
        self.refused.get_or_insert(Refused {
            message: format!(
                "this constant expression, evaluated, is over {}",
                Bound::Value
            ),
            range: Some(span.start_offset as usize..span.end_offset as usize),
        });
        None
    }
}
