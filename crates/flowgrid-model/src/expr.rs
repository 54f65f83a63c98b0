//! Sandboxed expressions (Rhai) with an evaluation budget.
//!
//! Expressions are compiled once per plan and evaluated against a [`Scope`] of JSON
//! values. Evaluation is deterministic (same scope, same result, same operation count),
//! which run replay depends on. No expression can touch files, the network or the clock.
//!
//! What an expression can use:
//! - Variables, where the place provides them: `input` (the run input), `steps.<id>`
//!   (`.status`, `.output`, `.error.code`, `.error.message` of a step that runs before),
//!   `item` and `index` (a map's item and its position), `result` (a worker's result in
//!   a task or map `output`, a child's output in a loop's `until`), `iteration` and
//!   `previous` (a loop's iteration and the output of the one before). Reading a
//!   variable the place does not provide is an error; reading a missing property
//!   (`input.nope`) gives `()`, which is JSON `null`.
//! - Literals: `#{name: "x", size: 3}` is an object, `[1, 2]` an array, `()` null.
//! - Operators, string and array functions (`+`, `==`, `.len()`, `.to_upper()`,
//!   `.map(|x| x * 2)`, `.filter(..)`, `.reduce(..)`, `` `n=${n}` `` interpolation, ...).
//!
//! Invariants:
//! - An expression is one expression: no statements (`let`, `;`), no loops, no `eval`,
//!   no printing, no modules, no clock, no sleeping.
//! - Other steps are readable only as `steps.<id>...`, so [`Expr::step_refs`] lists every
//!   step an expression can read.
//! - Every evaluation stays within [`Limits::expression_operations_max`] operations in all
//!   (closures called by `map`, `filter`, ... included), the text of one value (its
//!   strings together) within [`Limits::expression_text_bytes_max`] bytes, arrays and
//!   maps within [`Limits::map_items_max`] entries, and values nest at most
//!   [`VALUE_DEPTH_MAX`] levels. `map`, `zip`, `reduce`, `replace`, `split` and `pad` check
//!   these bounds as they build, not once they are done, counting the values a function
//!   pointer holds (`curry(|b| b, input.big)`) too.
//! - Float arithmetic and the math functions that would make NaN or infinity are an error
//!   where they happen, and so is a result or a `parse_float` that is one. A number literal
//!   too large for a float (`1e400`) still reads as infinity.
//!
//! ```
//! use flowgrid_model::{Evaluator, Limits, Scope};
//! use serde_json::json;
//!
//! let evaluator = Evaluator::new(&Limits::default());
//! let expr = evaluator.compile(r#"#{kind: steps.fetch.output.kind, size: input.size * 2}"#).unwrap();
//! assert_eq!(&*expr.step_refs, ["fetch".to_owned()]);
//! let input = json!({"size": 21});
//! let steps = json!({"fetch": {"status": "succeeded", "output": {"kind": "video"}}});
//! let scope = Scope { input: Some(&input), steps: steps.as_object(), ..Scope::default() };
//! assert_eq!(evaluator.eval(&expr, &scope).unwrap(), json!({"kind": "video", "size": 42}));
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, BitFieldPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{ASTNode, Dynamic, EvalAltResult, Expr as RhaiExpr, Stmt};
use serde_json::Value;

use crate::limits::Limits;

mod bounded;

pub use bounded::VALUE_DEPTH_MAX;

/// The stack a thread that evaluates expressions needs. A closure that wraps a variable it
/// captured, once per call (`input.a.map(|x| input.acc.push([[input.acc.split(0)]]))`),
/// nests a value about one level per operation of its budget, and Rhai checks, copies and
/// drops values recursively: tens of thousands of levels overflow a default thread's 2 MiB.
/// The coordinator's threads have this much; only the pages a thread touches take memory.
pub const EVALUATION_STACK_BYTES: usize = 64 << 20;

/// A compiled expression. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Expr {
    /// The expression as written.
    pub source: Arc<str>,
    /// Ids of the steps the expression reads as `steps.<id>`, so the engine puts only
    /// those into the scope.
    pub step_refs: Arc<[String]>,
    /// Whether the expression reads `input`: converting a large run input for every
    /// evaluation (e.g. once per map item) would cost more than the evaluation itself.
    pub reads_input: bool,
    /// Whether a closure of the expression reads a variable of the scope (`|x| x + input.k`):
    /// it is then evaluated with [`CAPTURED`].
    captures: bool,
    /// Whether it can be evaluated with a [`Prepared`] scope: it calls none of
    /// [`NOT_ON_SHARED_VARIABLES`].
    preparable: bool,
    ast: Arc<rhai::AST>,
}

/// What an expression can read. `steps` maps step id to
/// `{"status": .., "output": .., "error": {"code": .., "message": ..}}`.
#[derive(Debug, Default)]
pub struct Scope<'a> {
    pub input: Option<&'a Value>,
    pub steps: Option<&'a serde_json::Map<String, Value>>,
    pub item: Option<&'a Value>,
    pub index: Option<u32>,
    pub result: Option<&'a Value>,
    /// A loop's iteration (from 0).
    pub iteration: Option<u32>,
    /// The output of a loop's iteration before this one (`()` in the first).
    pub previous: Option<&'a Value>,
}

/// Why an expression could not be compiled or evaluated.
#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    /// The source does not parse; fix the expression at the reported position.
    #[error("syntax error in expression `{source_text}`: {message}")]
    Syntax { source_text: String, message: String },
    /// Evaluation failed (unknown variable, type error, budget exhausted, ...).
    #[error("expression `{source_text}` failed: {message}")]
    Eval { source_text: String, message: String },
    /// The value is not of the type the place requires (a condition must be a boolean).
    #[error("expression `{source_text}` gave {found}, expected {expected}")]
    Type { source_text: String, expected: &'static str, found: String },
}

/// Compiles and evaluates expressions under [`Limits`]. Cheap to share (`Send + Sync`).
pub struct Evaluator {
    engine: rhai::Engine,
    limits: Limits,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator").finish_non_exhaustive()
    }
}

/// Nesting of one expression's syntax tree: deep enough for any real mapping, shallow
/// enough that parsing and evaluation cannot exhaust the stack.
const EXPR_DEPTH_MAX: usize = 64;
/// Nesting inside anonymous functions (`.map(|x| ...)` bodies).
const FUNCTION_EXPR_DEPTH_MAX: usize = 32;
/// Nested function calls (anonymous functions calling each other): bounds recursion.
const CALL_LEVELS_MAX: usize = 16;
/// The call Rhai generates to hand captured variables to an anonymous function.
const CURRY_FUNCTION: &str = "curry";
/// The variable through which expressions read other steps.
const STEPS_VARIABLE: &str = "steps";
const INPUT_VARIABLE: &str = "input";
thread_local! {
    /// Operations of the evaluation running on this thread, across every call context.
    /// An evaluation never starts another one, so one counter per thread suffices.
    static OPERATIONS_USED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The variables of the evaluation running on this thread when a closure of its
    /// expression reads them. Rhai shares a variable a closure captures with the scope,
    /// and a method called on it (`input.items.map(|x| x + input.k)`) then finds it locked
    /// by its own call ("data race"). A variable resolved here is a cell of its own at each
    /// use, so the closure's and the method's are never the same one.
    static CAPTURED: std::cell::RefCell<Vec<(&'static str, Dynamic)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Adds `operations` to the evaluation's count, for work a function does that Rhai does
/// not count (walking a value); an error once the count passes `operations_max`.
fn charge_operations(operations: u64, operations_max: u64) -> Result<(), Box<EvalAltResult>> {
    let used = OPERATIONS_USED.with(|used| {
        used.set(used.get().saturating_add(operations));
        used.get()
    });
    if used > operations_max {
        return Err(EvalAltResult::ErrorTooManyOperations(rhai::Position::NONE).into());
    }
    Ok(())
}

/// Empties [`CAPTURED`] when an evaluation ends, however it ends.
struct CapturedGuard;

impl Drop for CapturedGuard {
    fn drop(&mut self) {
        CAPTURED.with(|captured| captured.borrow_mut().clear());
    }
}

/// What an author should write instead of another use of `steps`.
const STEPS_USAGE_HINT: &str = "refer to another step's data as steps.<id>.output or steps.<id>.error";

impl Evaluator {
    /// An evaluator whose every evaluation stays within `limits`: at most
    /// `expression_operations_max` operations, the text of one value up to
    /// `expression_text_bytes_max`, arrays
    /// and maps up to `map_items_max` entries. It has no `eval`, no printing, no modules,
    /// no clock and no randomness, so the same scope always gives the same result.
    pub fn new(limits: &Limits) -> Evaluator {
        let mut engine = rhai::Engine::new_raw();
        // The standard library minus what reads the clock (`timestamp`), blocks (`sleep`),
        // exits the script or parses into unbounded structures.
        let packages = [
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
            BasicFnPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
            BitFieldPackage::new().as_shared_module(),
        ];
        for package in packages {
            engine.register_global_module(package);
        }
        bounded::register(&mut engine, limits);
        register_finite_floats(&mut engine);
        // Rhai treats 0 as "unlimited"; a zero limit must never lift the budget.
        engine
            // Operators find the functions registered for them (`register_finite_floats`)
            // before Rhai's own; with fast operators, Rhai's own always run.
            .set_fast_operators(false)
            .set_max_operations(limits.expression_operations_max.max(1))
            .set_max_call_levels(CALL_LEVELS_MAX)
            .set_max_expr_depths(EXPR_DEPTH_MAX, FUNCTION_EXPR_DEPTH_MAX)
            // Rhai counts every string inside an array or map against this bound.
            .set_max_string_size(limits.expression_text_bytes_max.max(1))
            .set_max_array_size(limits.map_items_max.max(1))
            .set_max_map_size(limits.map_items_max.max(1))
            .set_max_modules(0)
            .set_allow_looping(false)
            .set_allow_statement_expression(false)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        // An expression whose closures read its variables finds them here (see `CAPTURED`);
        // a closure's own copy, a parameter of its function, is in the scope.
        // Rhai marks `on_var` volatile (as deprecated); `closure_tests` pin what it does here.
        #[allow(deprecated)]
        engine.on_var(|name, _index, context| {
            CAPTURED.with(|captured| {
                let captured = captured.borrow();
                if captured.is_empty() || context.scope().contains(name) {
                    return Ok(None);
                }
                // A cell of its own for each use (a copy out of a prepared variable's shared
                // cell): shared, so that a closure's calls pass it on without copying it, and
                // not the cell a method called on it holds.
                // (Inside a closure the variable is its parameter, one cell: a closure in a
                // closure that walks the same variable still meets the data race.)
                Ok(captured
                    .iter()
                    .find(|(captured, _)| *captured == name)
                    .map(|(_, value)| value.flatten_clone().into_shared()))
            })
        });
        // Rhai counts operations per call context: closures called by native functions
        // (`map`, `filter`, `reduce`, ...) start from a fresh count, so nested closures
        // could multiply the work. This counter spans the whole evaluation.
        let operations_max = limits.expression_operations_max.max(1);
        engine.on_progress(move |_| {
            let used = OPERATIONS_USED.with(|used| {
                used.set(used.get() + 1);
                used.get()
            });
            (used > operations_max).then_some(Dynamic::UNIT)
        });
        engine.on_print(|_| {}).on_debug(|_, _, _| {});
        for symbol in ["eval", "print", "debug", "import", "export"] {
            engine.disable_symbol(symbol);
        }
        Evaluator { engine, limits: limits.clone() }
    }

    /// The limits it evaluates under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles one expression (no statements) and records the steps it reads.
    ///
    /// Other steps are readable only as `steps.<id>...`; any other use of `steps` (an
    /// index such as `steps["x"]`, the bare map, a method on it) is a syntax error, so
    /// that [`Expr::step_refs`] is always complete.
    pub fn compile(&self, source: &str) -> Result<Expr, ExprError> {
        if source.len() > self.limits.expression_bytes_max {
            return Err(ExprError::Syntax {
                source_text: abbreviate(source),
                message: format!(
                    "the expression is {} bytes, over the limit of {} bytes: move the computation into a task",
                    source.len(),
                    self.limits.expression_bytes_max
                ),
            });
        }
        let ast = self.engine.compile_expression(source).map_err(|error| ExprError::Syntax {
            source_text: source.to_owned(),
            message: syntax_message(&error, source),
        })?;
        let step_refs =
            collect_step_refs(&ast).map_err(|message| ExprError::Syntax { source_text: source.to_owned(), message })?;
        let reads_input = reads_variable(&ast, INPUT_VARIABLE);
        let captures = captures_variables(&ast);
        // A closure's captures come as copies of their own (`CAPTURED`), whatever hands them
        // over; otherwise `curry` and `is_shared` would be given a prepared variable's cell.
        let preparable = !calls_any(&ast, NOT_ON_SHARED_VARIABLES)
            && (captures || !calls_any(&ast, &[CURRY_FUNCTION, "is_shared"]))
            && !names_a_function(&ast);
        Ok(Expr {
            source: Arc::from(source),
            step_refs: step_refs.into(),
            reads_input,
            captures,
            preparable,
            ast: Arc::new(ast),
        })
    }

    /// Evaluates `expr` with the variables of `scope` that are `Some`, and returns its
    /// value as JSON (`()` becomes `null`). A non-finite number in the result is an error.
    pub fn eval(&self, expr: &Expr, scope: &Scope) -> Result<Value, ExprError> {
        let mut variables = self.convert(expr, scope)?;
        let counters = [("index", scope.index), ("iteration", scope.iteration)];
        variables.extend(counters.into_iter().filter_map(|(name, value)| Some((name, counter(value?)))));
        self.run(expr, variables)
    }

    /// Converts the variables of `scope` for [`Evaluator::eval_prepared`], which evaluates
    /// `expr` with them and an `item` and `index` of its own, without converting them again;
    /// `None` for an expression that is not [`Expr::preparable`]. The scope's `item`,
    /// `index` and `iteration` are left out.
    pub fn prepare(&self, expr: &Expr, scope: &Scope) -> Result<Option<Prepared>, ExprError> {
        if !expr.preparable {
            return Ok(None);
        }
        let scope = Scope { item: None, ..*scope };
        let variables = self.convert(expr, &scope)?;
        // Read-only through and through, should a function that changes its value reach
        // one: it is refused, not seen by the next item.
        let variables = variables.into_iter().map(|(name, value)| (name, value.into_read_only().into_shared()));
        Ok(Some(Prepared { variables: variables.collect() }))
    }

    /// Evaluates `expr` as [`Evaluator::eval`] does, with the variables `prepared` holds
    /// (prepared for `expr`) and `item` and `index`.
    pub fn eval_prepared(
        &self,
        expr: &Expr,
        prepared: &Prepared,
        item: Option<&Value>,
        index: Option<u32>,
    ) -> Result<Value, ExprError> {
        let mut variables = prepared.variables.clone();
        if let Some(item) = item {
            variables.push(("item", convert("item", item).map_err(|message| eval_error(expr, message))?));
        }
        variables.extend(index.map(|index| ("index", counter(index))));
        self.run(expr, variables)
    }

    /// The JSON variables of `scope` the expression can read, converted.
    fn convert(&self, expr: &Expr, scope: &Scope) -> Result<Vec<(&'static str, Dynamic)>, ExprError> {
        let json_variables = [
            (INPUT_VARIABLE, scope.input.filter(|_| expr.reads_input)),
            ("item", scope.item),
            ("result", scope.result),
            ("previous", scope.previous),
        ];
        let mut variables = Vec::with_capacity(json_variables.len() + 1);
        for (name, value) in json_variables {
            if let Some(value) = value {
                variables.push((name, convert(name, value).map_err(|message| eval_error(expr, message))?));
            }
        }
        if let Some(steps) = scope.steps {
            let steps = convert(STEPS_VARIABLE, steps).map_err(|message| eval_error(expr, message))?;
            variables.push((STEPS_VARIABLE, steps));
        }
        Ok(variables)
    }

    /// Evaluates `expr` with `variables`.
    fn run(&self, expr: &Expr, variables: Vec<(&'static str, Dynamic)>) -> Result<Value, ExprError> {
        let eval_error = |message: String| eval_error(expr, message);
        let mut rhai_scope = rhai::Scope::new();
        let _captured_guard = CapturedGuard;
        if expr.captures {
            CAPTURED.with(|slot| *slot.borrow_mut() = variables);
        } else {
            for (name, value) in variables {
                rhai_scope.push_dynamic(name, value);
            }
        }
        OPERATIONS_USED.with(|used| used.set(0));
        let value = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut rhai_scope, &expr.ast)
            .map_err(|error| eval_error(self.describe_eval_error(&error)))?
            .flatten();
        if value.is_unit() {
            return Ok(Value::Null);
        }
        match unrepresentable(&value, &mut String::from("the result"), VALUE_DEPTH_MAX) {
            Some(Unrepresentable::TooDeep) => {
                return Err(eval_error(self.describe_eval_error(&bounded::too_deep("the expression"))));
            }
            Some(Unrepresentable::NotFinite(path)) => {
                return Err(eval_error(format!(
                    "{path} is not a finite number (NaN or infinity cannot be represented in JSON)"
                )));
            }
            None => {}
        }
        rhai::serde::from_dynamic::<Value>(&value).map_err(|error| {
            eval_error(format!("the result ({}) cannot be turned into JSON: {error}", value.type_name()))
        })
    }

    /// Evaluates a wait's length: a number of milliseconds from 0 to
    /// [`WAIT_MS_MAX`](crate::plan::WAIT_MS_MAX); a fraction is rounded up.
    pub fn eval_wait_ms(&self, expr: &Expr, scope: &Scope) -> Result<u64, ExprError> {
        let value = self.eval(expr, scope)?;
        match value.as_f64() {
            Some(millis) if (0.0..=crate::plan::WAIT_MS_MAX as f64).contains(&millis) => Ok(millis.ceil() as u64),
            _ => Err(ExprError::Type {
                source_text: expr.source.to_string(),
                expected: crate::plan::WAIT_MS_EXPECTED,
                found: describe_json(&value),
            }),
        }
    }

    /// Evaluates a `wait` step's `until` at `now`: the milliseconds from `now` to the time
    /// it gives (Unix ms, or an RFC 3339 text), 0 for a time past; a time more than
    /// [`crate::plan::WAIT_MS_MAX`] ahead is an error.
    pub fn eval_wait_until(&self, expr: &Expr, scope: &Scope, now: u64) -> Result<u64, ExprError> {
        let value = self.eval(expr, scope)?;
        let until_ms = match &value {
            // A time before 1970 is past as any other (a number no larger than 0 waits 0).
            Value::Number(number) => number.as_f64().map(|millis| millis.max(0.0).ceil() as u64),
            // A time before 1970 (`0001-01-01T00:00:00Z`, an unset time in some languages) is
            // past as any other.
            Value::String(text) => {
                chrono::DateTime::parse_from_rfc3339(text).ok().map(|time| time.timestamp_millis().max(0) as u64)
            }
            _ => None,
        };
        match until_ms {
            Some(until_ms) if until_ms.saturating_sub(now) <= crate::plan::WAIT_MS_MAX => {
                Ok(until_ms.saturating_sub(now))
            }
            _ => Err(ExprError::Type {
                source_text: expr.source.to_string(),
                expected: "a time within 366 days: Unix milliseconds, or an RFC 3339 text with its offset (`Z` or \
                           `+01:00`) such as \"2026-12-24T09:00:00Z\"",
                found: describe_json(&value),
            }),
        }
    }

    /// Evaluates a condition: the value must be a boolean.
    pub fn eval_bool(&self, expr: &Expr, scope: &Scope) -> Result<bool, ExprError> {
        match self.eval(expr, scope)? {
            Value::Bool(value) => Ok(value),
            other => Err(ExprError::Type {
                source_text: expr.source.to_string(),
                expected: "a boolean",
                found: describe_json(&other),
            }),
        }
    }

    fn describe_eval_error(&self, error: &EvalAltResult) -> String {
        let position = error.position();
        let at = if position.is_none() { String::new() } else { format!(" ({position})") };
        match error.unwrap_inner() {
            EvalAltResult::ErrorTooManyOperations(..) | EvalAltResult::ErrorTerminated(..) => format!(
                "exceeded the expression budget of {} operations{at}: simplify the expression or move the work into a task",
                self.limits.expression_operations_max.max(1)
            ),
            EvalAltResult::ErrorDataTooLarge(what, ..) => format!(
                "{what} exceeds the size limit{at}: one value's text (its strings together) is bounded to {} bytes, \
                 an array or map to {} entries; pass large data by reference",
                self.limits.expression_text_bytes_max, self.limits.map_items_max
            ),
            EvalAltResult::ErrorVariableNotFound(name, ..) => format!(
                "unknown variable `{name}`{at}: expressions can read input, steps, and where the step provides them item, index, result, iteration and previous"
            ),
            EvalAltResult::ErrorDataRace(..) => format!(
                "a closure inside a closure reads the variable the outer one walks{at}: take what the inner one \
                 needs out of the outer closure's item, or split the work over two steps"
            ),
            _ => error.to_string(),
        }
    }
}

/// A float operation of two operands.
type FloatOperation = fn(f64, f64) -> f64;
/// A float function of one argument.
type FloatFunction = fn(f64) -> f64;

/// Arithmetic operators between floats (and a float and an integer) that can turn finite
/// numbers into NaN or infinity.
const FLOAT_OPERATORS: [(&str, FloatOperation); 6] = [
    ("+", |left, right| left + right),
    ("-", |left, right| left - right),
    ("*", |left, right| left * right),
    ("/", |left, right| left / right),
    ("%", |left, right| left % right),
    ("**", f64::powf),
];
/// Math functions of one float that can turn a finite one into NaN or infinity.
const FLOAT_FUNCTIONS: [(&str, FloatFunction); 11] = [
    ("sqrt", f64::sqrt),
    ("exp", f64::exp),
    ("ln", f64::ln),
    ("log", f64::log10),
    ("sinh", f64::sinh),
    ("cosh", f64::cosh),
    ("asin", f64::asin),
    ("acos", f64::acos),
    ("acosh", f64::acosh),
    ("atanh", f64::atanh),
    ("to_degrees", f64::to_degrees),
];
/// Math functions of two floats that can turn finite ones into NaN or infinity.
const FLOAT_FUNCTIONS_OF_TWO: [(&str, FloatOperation); 2] = [("log", f64::log), ("hypot", f64::hypot)];

/// Registers the float arithmetic of [`FLOAT_OPERATORS`] and [`FLOAT_FUNCTIONS`], `to_int`
/// and `parse_float` of the packages again, an error where they would make NaN or infinity:
/// used on (`input.done / input.total > 0.5` with a total of 0.0, `nan.to_int()`) they
/// would give a value no JSON holds, silently. With all of them finite, no expression
/// holds a NaN or an infinity.
fn register_finite_floats(engine: &mut rhai::Engine) {
    type Outcome = Result<f64, Box<EvalAltResult>>;
    for (operator, operate) in FLOAT_OPERATORS {
        let finite = move |left: f64, right: f64| -> Outcome {
            finite(operate(left, right), || format!("`{left:?} {operator} {right:?}`"))
        };
        engine.register_fn(operator, finite);
        engine.register_fn(operator, move |left: f64, right: rhai::INT| finite(left, right as f64));
        engine.register_fn(operator, move |left: rhai::INT, right: f64| finite(left as f64, right));
    }
    for (name, function) in FLOAT_FUNCTIONS {
        engine.register_fn(name, move |x: f64| -> Outcome { finite(function(x), || format!("`{name}({x:?})`")) });
    }
    for (name, function) in FLOAT_FUNCTIONS_OF_TWO {
        engine.register_fn(name, move |x: f64, y: f64| -> Outcome {
            finite(function(x, y), || format!("`{name}({x:?}, {y:?})`"))
        });
    }
    engine.register_fn("parse_float", |text: &str| -> Outcome {
        let number = text.trim().parse::<f64>().map_err(|error| {
            EvalAltResult::ErrorArithmetic(
                format!("Error parsing floating-point number '{text}': {error}"),
                rhai::Position::NONE,
            )
        })?;
        finite(number, || format!("`parse_float({text:?})`"))
    });
    engine.register_fn("to_int", |x: f64| -> Result<rhai::INT, Box<EvalAltResult>> {
        let x = finite(x, || format!("`to_int({x:?})`"))?;
        // As the package's: out of the integers' range is an error, a fraction is cut off.
        if x > rhai::INT::MAX as f64 || x < rhai::INT::MIN as f64 {
            let message = format!("Integer overflow: to_int({x})");
            return Err(EvalAltResult::ErrorArithmetic(message, rhai::Position::NONE).into());
        }
        Ok(x.trunc() as rhai::INT)
    });
}

/// `number` if it is finite; otherwise an error saying that what `made` names gave NaN or
/// infinity.
fn finite(number: f64, made: impl FnOnce() -> String) -> Result<f64, Box<EvalAltResult>> {
    if number.is_finite() {
        return Ok(number);
    }
    let what = if number.is_nan() {
        "NaN"
    } else if number > 0.0 {
        "infinity"
    } else {
        "-infinity"
    };
    let message = format!(
        "{} gives {what}, not a finite number (NaN or infinity cannot be represented in JSON): check the \
         operands first, as in `if total != 0.0 {{ done / total }} else {{ 0.0 }}`",
        made()
    );
    Err(EvalAltResult::ErrorArithmetic(message, rhai::Position::NONE).into())
}

/// The variables of a scope converted once by [`Evaluator::prepare`], to evaluate one
/// expression for many items (a map's `input`): converting the run input for every item
/// costs more than the evaluation (10 ms for half a megabyte of input). Shared, so that
/// each evaluation takes them without copying them.
#[derive(Clone)]
pub struct Prepared {
    variables: Vec<(&'static str, Dynamic)>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.variables.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Prepared").field("variables", &names).finish()
    }
}

fn convert(name: &str, value: &impl serde::Serialize) -> Result<Dynamic, String> {
    rhai::serde::to_dynamic(value).map_err(|error| format!("cannot read `{name}`: {error}"))
}

fn counter(value: u32) -> Dynamic {
    Dynamic::from(rhai::INT::from(value))
}

fn eval_error(expr: &Expr, message: String) -> ExprError {
    ExprError::Eval { source_text: expr.source.to_string(), message }
}

/// A syntax error as Rhai says it, with a way out where a field's name is a keyword of
/// the language (`input.go`, `input.default`), or a step's id (`steps.go`: only another id).
fn syntax_message(error: &rhai::ParseError, source: &str) -> String {
    let message = error.to_string();
    if let rhai::ParseErrorType::Reserved(word) = &*error.0 {
        if reads_step_named(source, word) {
            return format!(
                "{message}: a step whose id the expression language reserves cannot be read as steps.{word}: give \
                 step `{word}` another id"
            );
        }
    }
    if matches!(*error.0, rhai::ParseErrorType::Reserved(..)) || message.contains("reserved keyword") {
        return format!("{message}: read a field named so with brackets, e.g. input[\"go\"]");
    }
    message
}

/// Whether `source` reads the step `id` as `steps.<id>`: the whole word `steps`, not a
/// property so named (`input.steps.go`), followed by the whole word `id` (`steps.gone` reads
/// another step).
fn reads_step_named(source: &str, id: &str) -> bool {
    let is_word = |character: char| character.is_alphanumeric() || character == '_';
    let reference = format!("{STEPS_VARIABLE}.{id}");
    source.match_indices(&reference).any(|(at, _)| {
        let before = source[..at].chars().next_back();
        let after = source[at + reference.len()..].chars().next();
        !before.is_some_and(|character| is_word(character) || character == '.') && !after.is_some_and(is_word)
    })
}

/// Functions an expression evaluated with a [`Prepared`] scope may not call: those of the
/// standard packages that Rhai refuses on a read-only value (not marked pure: most change
/// the value they are called on, and `get`, `extract` and `order` copy out of it), and
/// those that hand a variable's cell on as it is (`curry` and `is_shared`, where no closure
/// captures: see [`Evaluator::compile`]). A name shared with a function that may be called
/// (the string's `split` is pure, the array's is not) counts too: such an expression is
/// evaluated with a scope converted for each item, as it always was. (`contains` on a
/// range is not pure either, but a range is never a variable.)
const NOT_ON_SHARED_VARIABLES: &[&str] = &[
    "append",
    "chop",
    "clear",
    "crop",
    "dedup",
    "drain",
    "extract",
    "fill_with",
    "for_each",
    "get",
    "insert",
    "make_lower",
    "make_upper",
    "mixin",
    "order",
    "order_by",
    "order_desc",
    "pad",
    "pop",
    "push",
    "remove",
    "replace",
    "retain",
    "reverse",
    "set",
    "set_bit",
    "set_bits",
    "set_tag",
    "shift",
    "sort",
    "sort_by",
    "sort_desc",
    "splice",
    "split",
    "take",
    "trim",
    "truncate",
];

/// Whether `ast` (its closures too) calls a function or method named in `names`.
fn calls_any(ast: &rhai::AST, names: &[&str]) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(RhaiExpr::FnCall(call, ..) | RhaiExpr::MethodCall(call, ..))) = path.last() {
            found |= names.contains(&call.name.as_str());
        }
        if let Some(ASTNode::Stmt(Stmt::FnCall(call, ..))) = path.last() {
            found |= names.contains(&call.name.as_str());
        }
        !found
    });
    found
}

/// Functions that call another one given by its name (`input.a.map("to_string")`).
const TAKING_A_FUNCTION: &[&str] = &[
    "all",
    "dedup",
    "drain",
    "filter",
    "find",
    "find_map",
    "for_each",
    "index_of",
    "map",
    "order",
    "order_by",
    "reduce",
    "reduce_rev",
    "retain",
    "some",
    "sort",
    "sort_by",
    "zip",
];

/// Whether `ast` calls a function by its name (`Fn("pop")`, `input.a.map("pop")`, `call`):
/// such a function may be one Rhai refuses on a read-only value, which the names the
/// expression calls do not show.
fn names_a_function(ast: &rhai::AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        found |= match path.last() {
            Some(ASTNode::Expr(RhaiExpr::FnCall(call, ..) | RhaiExpr::MethodCall(call, ..)))
            | Some(ASTNode::Stmt(Stmt::FnCall(call, ..))) => {
                matches!(call.name.as_str(), "Fn" | "call")
                    || (TAKING_A_FUNCTION.contains(&call.name.as_str())
                        && call.args.iter().any(|argument| matches!(argument, RhaiExpr::StringConstant(..))))
            }
            Some(ASTNode::Expr(RhaiExpr::DynamicConstant(value, ..))) => {
                value.read_lock::<rhai::FnPtr>().is_some_and(|pointer| !pointer.is_anonymous())
            }
            _ => false,
        };
        !found
    });
    found
}

/// Whether a closure of `ast` captures a variable (Rhai marks each capture with a `Share`).
fn captures_variables(ast: &rhai::AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        found |= matches!(path.last(), Some(ASTNode::Stmt(Stmt::Share(..))));
        !found
    });
    found
}

impl Expr {
    /// Whether it can be evaluated with a scope prepared once for many items
    /// ([`Evaluator::prepare`]).
    pub fn preparable(&self) -> bool {
        self.preparable
    }

    /// Whether the expression reads the variable `name` of its scope (`item`, `result`):
    /// a closure's own parameter of that name is not the scope's. Closures are functions
    /// of their own, left out here; one that reads the scope's variable captures it, which
    /// shows in the expression's statements.
    pub fn reads(&self, name: &str) -> bool {
        reads_variable(&self.ast.clone_statements_only(), name)
    }

    /// The variables of its scope the expression reads (`input`, `item`, or a misspelt
    /// `inptu` no scope has), sorted and without repeats. As in [`Expr::reads`], a closure's
    /// own parameters are not among them, and a variable of the scope a closure reads is,
    /// through its capture.
    pub fn variables(&self) -> BTreeSet<String> {
        let mut variables = BTreeSet::new();
        self.ast.clone_statements_only().walk(&mut |path: &[ASTNode]| {
            if let Some(ASTNode::Expr(RhaiExpr::Variable(variable, ..))) = path.last() {
                variables.insert(variable.1.to_string());
            }
            true
        });
        variables
    }
}

/// Whether the expression reads the variable `name` anywhere (anonymous functions that
/// read it capture it, so the capture shows in the expression's own tree).
fn reads_variable(ast: &rhai::AST, name: &str) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(RhaiExpr::Variable(variable, ..))) = path.last() {
            found |= variable.1.as_str() == name;
        }
        !found
    });
    found
}

/// The steps an expression reads as `steps.<id>`, sorted and unique; an error message for
/// any other use of `steps`.
fn collect_step_refs(ast: &rhai::AST) -> Result<Vec<String>, String> {
    let mut step_refs = BTreeSet::new();
    let mut misuse: Option<String> = None;
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(ASTNode::Expr(node @ RhaiExpr::Variable(variable, ..))) = path.last() else {
            return true;
        };
        if variable.1.as_str() != STEPS_VARIABLE {
            return true;
        }
        let parent = path.len().checked_sub(2).map(|position| &path[position]);
        match parent.and_then(|parent| step_ref_of(parent, node, ast)) {
            Some(StepRef::Step(id)) => {
                step_refs.insert(id);
                true
            }
            Some(StepRef::Captured) => true,
            None => {
                misuse = Some(format!("`steps` used at {}: {STEPS_USAGE_HINT}", node.position()));
                false
            }
        }
    });
    match misuse {
        Some(message) => Err(message),
        None => Ok(step_refs.into_iter().collect()),
    }
}

enum StepRef {
    /// `steps.<id>...`
    Step(String),
    /// `steps` captured by an anonymous function, whose body is checked on its own.
    Captured,
}

/// How `parent` uses its child `variable` (the `steps` variable) in `ast`, if that use is
/// allowed.
fn step_ref_of(parent: &ASTNode, variable: &RhaiExpr, ast: &rhai::AST) -> Option<StepRef> {
    match parent {
        ASTNode::Expr(RhaiExpr::Dot(binary, ..)) if std::ptr::eq(&binary.lhs, variable) => {
            let property = match &binary.rhs {
                RhaiExpr::Property(property, ..) => property,
                RhaiExpr::Dot(inner, ..) | RhaiExpr::Index(inner, ..) => match &inner.lhs {
                    RhaiExpr::Property(property, ..) => property,
                    _ => return None,
                },
                _ => return None,
            };
            Some(StepRef::Step(property.2.to_string()))
        }
        ASTNode::Expr(RhaiExpr::FnCall(call, ..)) | ASTNode::Stmt(Stmt::FnCall(call, ..))
            if call.name.as_str() == CURRY_FUNCTION =>
        {
            let position = call.args.iter().skip(1).position(|argument| std::ptr::eq(argument, variable))?;
            captured_as_steps(&call.args[0], position, ast).then_some(StepRef::Captured)
        }
        _ => None,
    }
}

/// Whether `curried` (the first argument of a `curry` call) is an anonymous function of
/// `ast` whose parameter at `position` is named `steps`: the shape Rhai generates for a
/// closure that reads `steps`, handing it over as the closure's own `steps`, whose body
/// reads it as `steps.<id>` (checked with the rest of `ast`). Any other function given
/// `steps` (`curry(|s| s.b.output, steps)`) reads steps no `steps.<id>` names.
fn captured_as_steps(curried: &RhaiExpr, position: usize, ast: &rhai::AST) -> bool {
    let RhaiExpr::DynamicConstant(value, ..) = curried else { return false };
    let Some(pointer) = value.read_lock::<rhai::FnPtr>() else { return false };
    if !pointer.is_anonymous() {
        return false;
    }
    ast.iter_functions()
        .find(|function| function.name == pointer.fn_name())
        .is_some_and(|function| function.params.get(position) == Some(&STEPS_VARIABLE))
}

/// Why an expression's value cannot be its JSON result.
enum Unrepresentable {
    /// Arrays and maps nest deeper than [`VALUE_DEPTH_MAX`].
    TooDeep,
    /// A NaN or an infinity, at this place.
    NotFinite(String),
}

/// What keeps `value` (at `path`) from being a JSON result, found in one walk of it that
/// goes no deeper than `depth_left` levels.
fn unrepresentable(value: &Dynamic, path: &mut String, depth_left: usize) -> Option<Unrepresentable> {
    use std::fmt::Write as _;
    if let Ok(number) = value.as_float() {
        return (!number.is_finite()).then(|| Unrepresentable::NotFinite(path.clone()));
    }
    if let Some(array) = value.read_lock::<rhai::Array>() {
        let Some(depth_left) = depth_left.checked_sub(1) else { return Some(Unrepresentable::TooDeep) };
        for (position, element) in array.iter().enumerate() {
            let length = path.len();
            let _ = write!(path, "[{position}]");
            if let Some(found) = unrepresentable(element, path, depth_left) {
                return Some(found);
            }
            path.truncate(length);
        }
    } else if let Some(map) = value.read_lock::<rhai::Map>() {
        let Some(depth_left) = depth_left.checked_sub(1) else { return Some(Unrepresentable::TooDeep) };
        for (key, element) in map.iter() {
            let length = path.len();
            let _ = write!(path, ".{key}");
            if let Some(found) = unrepresentable(element, path, depth_left) {
                return Some(found);
            }
            path.truncate(length);
        }
    }
    None
}

/// The kind of a JSON value, for error messages ("an array", "null", ...).
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe_json(value: &Value) -> String {
    let kind = json_kind(value);
    let text = value.to_string();
    if text.len() > 64 {
        kind.to_owned()
    } else {
        format!("{kind} ({text})")
    }
}

/// The start of an overlong source, for error messages.
fn abbreviate(source: &str) -> String {
    let mut end = source.len().min(80);
    while !source.is_char_boundary(end) {
        end -= 1;
    }
    if end < source.len() {
        format!("{}...", &source[..end])
    } else {
        source.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn evaluator() -> Evaluator {
        Evaluator::new(&Limits::default())
    }

    fn eval(source: &str, scope: &Scope) -> Result<Value, ExprError> {
        let evaluator = evaluator();
        let expr = evaluator.compile(source)?;
        evaluator.eval(&expr, scope)
    }

    fn eval_plain(source: &str) -> Value {
        eval(source, &Scope::default()).unwrap_or_else(|error| panic!("{source}: {error}"))
    }

    #[test]
    fn arithmetic_keeps_integers_and_floats_apart() {
        assert_eq!(eval_plain("1 + 2 * 3"), json!(7));
        assert_eq!(eval_plain("7 / 2"), json!(3));
        assert_eq!(eval_plain("7.0 / 2"), json!(3.5));
        assert_eq!(eval_plain("2 ** 10"), json!(1024));
    }

    #[test]
    fn object_and_array_literals_become_json() {
        assert_eq!(
            eval_plain("#{a: 1, b: [1, 2.5, \"x\", true, ()]}"),
            json!({"a": 1, "b": [1, 2.5, "x", true, null]})
        );
        assert_eq!(eval_plain("()"), Value::Null);
    }

    #[test]
    fn string_operations_work() {
        assert_eq!(eval_plain(r#""abc" + "def""#), json!("abcdef"));
        assert_eq!(eval_plain(r#""Hello".to_upper()"#), json!("HELLO"));
        assert_eq!(eval_plain(r#""a,b,c".split(",").len()"#), json!(3));
        assert_eq!(eval_plain(r#"`n=${1 + 1}`"#), json!("n=2"));
    }

    #[test]
    fn reads_input_item_index_and_result() {
        let input = json!({"x": 41, "name": "clip"});
        let item = json!(21);
        let result = json!({"width": 640});
        let scope =
            Scope { input: Some(&input), item: Some(&item), index: Some(3), result: Some(&result), ..Scope::default() };
        assert_eq!(eval("input.x + 1", &scope).unwrap(), json!(42));
        assert_eq!(eval("item * 2", &scope).unwrap(), json!(42));
        assert_eq!(eval("index", &scope).unwrap(), json!(3));
        assert_eq!(eval("#{w: result.width, n: input.name}", &scope).unwrap(), json!({"w": 640, "n": "clip"}));
        assert_eq!(eval("input.missing", &scope).unwrap(), Value::Null);
    }

    #[test]
    fn reads_other_steps_and_records_them() {
        let evaluator = evaluator();
        let expr =
            evaluator.compile(r#"steps.fetch.output.kind == "video" && steps.probe.status == "succeeded""#).unwrap();
        assert_eq!(&*expr.step_refs, ["fetch".to_owned(), "probe".to_owned()]);
        let steps = json!({
            "fetch": {"status": "succeeded", "output": {"kind": "video"}},
            "probe": {"status": "succeeded", "output": null},
        });
        let scope = Scope { steps: steps.as_object(), ..Scope::default() };
        assert!(evaluator.eval_bool(&expr, &scope).unwrap());
    }

    #[test]
    fn step_refs_cover_indexing_and_anonymous_functions() {
        let evaluator = evaluator();
        let expr = evaluator.compile(r#"steps.a.output["k"] + [1, 2].map(|x| x + steps.b.output).len()"#).unwrap();
        assert_eq!(&*expr.step_refs, ["a".to_owned(), "b".to_owned()]);
        // A closure in a closure, and a closure that captures other variables before `steps`.
        let expr = evaluator
            .compile("[1].map(|x| input.k + [2].map(|y| item + y + steps.c.output).len() + steps.a.output)")
            .unwrap();
        assert_eq!(&*expr.step_refs, ["a".to_owned(), "c".to_owned()]);
        let expr = evaluator.compile(r#""steps.fake" + input.steps"#).unwrap();
        assert!(expr.step_refs.is_empty());
    }

    #[test]
    fn other_uses_of_steps_are_refused() {
        let evaluator = evaluator();
        for source in [
            r#"steps["x"]"#,
            "steps",
            "steps.keys()",
            "[1].map(|steps| steps)",
            // Handed to a closure by hand, the step it reads is not `steps.<id>`.
            "curry(|s| s.b.output, steps).call()",
            "curry(|x, s| s.b.output, 1, steps).call()",
        ] {
            match evaluator.compile(source) {
                Err(ExprError::Syntax { message, .. }) => {
                    assert!(message.contains("steps.<id>.output"), "{source}: {message}")
                }
                other => panic!("{source}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn statements_and_disabled_features_do_not_compile() {
        let evaluator = evaluator();
        for source in ["let x = 1", "x = 1", r#"eval("1")"#, r#"print("x")"#, r#"import "m" as m"#, "1; 2", "loop { }"]
        {
            assert!(matches!(evaluator.compile(source), Err(ExprError::Syntax { .. })), "{source} compiled");
        }
        for source in ["timestamp()", "sleep(1)", "exit()"] {
            assert!(matches!(eval(source, &Scope::default()), Err(ExprError::Eval { .. })), "{source} ran");
        }
    }

    #[test]
    fn budget_exhaustion_is_an_eval_error() {
        let input = json!({"list": vec![1; 1_000]});
        let item = json!(vec![2; 1_000]);
        let scope = Scope { input: Some(&input), item: Some(&item), ..Scope::default() };
        // The budget spans closures called by native functions, so nesting cannot multiply it.
        assert!(eval("input.list.map(|x| x * 2).reduce(|sum, x| sum + x, 0)", &scope).is_ok());
        match eval("input.list.map(|x| item.map(|y| x * y).len()).len()", &scope) {
            Err(ExprError::Eval { message, .. }) => {
                assert!(message.contains("budget of 100000 operations"), "{message}")
            }
            other => panic!("expected an eval error, got {other:?}"),
        }
    }

    #[test]
    fn oversized_values_are_refused() {
        let limits = Limits { expression_text_bytes_max: 100, map_items_max: 10, ..Limits::default() };
        let evaluator = Evaluator::new(&limits);
        let input = json!({"s": "y".repeat(60)});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for source in [
            r#""x".pad(1000, "y")"#,
            "[0].pad(100, 0)",
            "[input.s, input.s].len()",
            // The size a padding makes is counted without overflowing (it used to panic).
            "[].pad(4611686018427387904, [0, 0, 0])",
            "[].pad(9223372036854775807, #{a: 1})",
        ] {
            let expr = evaluator.compile(source).unwrap();
            let error = evaluator.eval(&expr, &scope).unwrap_err();
            assert!(error.to_string().contains("size limit"), "{source}: {error}");
        }
        // Refused before it is built (60 times 60 bytes would be 3,600), not after.
        for source in [r#"input.s.replace("y", input.s)"#, r#"input.s.replace('y', input.s)"#] {
            let expr = evaluator.compile(source).unwrap();
            let error = evaluator.eval(&expr, &scope).unwrap_err().to_string();
            assert!(error.contains("the text replace would make exceeds the size limit"), "{source}: {error}");
        }
        // With the default bounds, a replacement that would build a terabyte out of a run's
        // input of a megabyte is refused as well (it used to try, and the process died).
        let default = Evaluator::new(&Limits::default());
        let megabyte = json!({"s": "y".repeat(1 << 20)});
        let bomb = default.compile(r#"input.s.replace("y", input.s)"#).unwrap();
        let refused =
            default.eval(&bomb, &Scope { input: Some(&megabyte), ..Scope::default() }).unwrap_err().to_string();
        assert!(refused.contains("replace would make"), "{refused}");
        // Within the bound, replace runs (it changes its string in place, so an expression
        // sees no result of it: a closure may not hold statements).
        for source in [r#""a-b".replace("-", "--")"#, r#""a-b".replace('-', "++")"#, r#""ab".replace("", ".")"#] {
            let expr = evaluator.compile(source).unwrap();
            assert_eq!(evaluator.eval(&expr, &scope).unwrap(), Value::Null, "{source}");
        }
    }

    #[test]
    fn values_built_item_by_item_stop_at_their_bounds() {
        // Each item's string is within the bound, all of them together a thousand times
        // over: `map` stops at the bound (it used to build them all, and the process died).
        let default = evaluator();
        let input = json!({"a": vec![0; 10_000], "s": "y".repeat(1 << 20)});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for source in ["input.a.map(|x| input.s + \"!\")", "input.a.zip(input.a, |x, y| input.s + \"!\")"] {
            let expr = default.compile(source).unwrap();
            let error = default.eval(&expr, &scope).unwrap_err().to_string();
            assert!(error.contains("makes exceeds the size limit"), "{source}: {error}");
        }
        // A value carried through `reduce` nests a level per item: stopped at the depth bound
        // (it used to overflow the stack).
        for source in ["input.a.reduce(|acc, x| [acc], ())", "input.a.reduce_rev(|acc, x| #{a: acc})"] {
            let expr = default.compile(source).unwrap();
            let error = default.eval(&expr, &scope).unwrap_err().to_string();
            assert!(error.contains("nests deeper than 64 levels"), "{source}: {error}");
        }
        // Walking the value carried through `reduce` at each step counts against the budget:
        // a large one carried over many items runs out of it instead of walking for seconds.
        let big = json!({"a": vec![0; 30_000], "big": vec![0; 100_000]});
        let walked = default.compile("input.a.reduce(|acc, x| acc, input.big).len()").unwrap();
        let error = default.eval(&walked, &Scope { input: Some(&big), ..Scope::default() }).unwrap_err();
        assert!(error.to_string().contains("budget of 100000 operations"), "{error}");
        // Within the bounds they work as the package's, index argument included.
        let small = json!({"a": [1, 2, 3]});
        let scope = Scope { input: Some(&small), ..Scope::default() };
        let cases = [
            ("input.a.map(|x, i| x * i)", json!([0, 2, 6])),
            ("input.a.zip([10, 20], |x, y| x + y)", json!([11, 22])),
            ("input.a.reduce(|acc, x| acc + x, 0)", json!(6)),
            ("input.a.reduce(|acc, x, i| (acc ?? 0) + x * i)", json!(8)),
            ("input.a.reduce_rev(|acc, x| acc + [x], [])", json!([3, 2, 1])),
            ("input.a.reduce(|acc, x| [acc], ())", json!([[[null]]])),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &scope).unwrap_or_else(|error| panic!("{source}: {error}")), expected, "{source}");
        }
        // The entries of the values a map makes count together, as Rhai counts one value's.
        let limits = Limits { map_items_max: 10, ..Limits::default() };
        let evaluator = Evaluator::new(&limits);
        let expr = evaluator.compile("input.a.map(|x| [x, x, x])").unwrap();
        let error = evaluator.eval(&expr, &scope).unwrap_err().to_string();
        assert!(error.contains("the array map makes exceeds the size limit"), "{error}");
        // An object map's `map` and a text's pieces are counted as they are made, too.
        let keys: serde_json::Map<String, Value> = (0..1_000).map(|key| (format!("k{key}"), json!(key))).collect();
        let input = json!({"m": keys, "s": "a,".repeat(20)});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for (source, refusal) in [
            ("input.m.map(|k| k)", "the object map map makes exceeds the size limit"),
            (r#"input.s.split(",")"#, "the array of pieces split makes exceeds the size limit"),
            ("input.s.split_rev(',')", "the array of pieces split makes exceeds the size limit"),
            ("input.s.to_chars()", "the array of characters to_chars makes exceeds the size limit"),
        ] {
            let expr = evaluator.compile(source).unwrap();
            let error = evaluator.eval(&expr, &scope).unwrap_err().to_string();
            assert!(error.contains(refusal), "{source}: {error}");
        }
    }

    #[test]
    fn functions_named_by_text_and_every_replace_form_stop_at_their_bounds() {
        let evaluator =
            Evaluator::new(&Limits { map_items_max: 10, expression_text_bytes_max: 10, ..Limits::default() });
        let input = json!({"s": "aaaaa", "e": ""});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for (source, refusal) in [
            (r#"["abcdefgh", "abcdefgh"].map("to_chars")"#, "the array map makes exceeds the size limit"),
            (r#"(input.s + "").replace("", '!')"#, "the text replace would make"),
            (r#"(input.s + "").replace('a', "!!!")"#, "the text replace would make"),
            (r#"(input.s + "").replace("a", '😀')"#, "the text replace would make"),
            (r#"(input.s + "").replace('a', '😀')"#, "the text replace would make"),
        ] {
            let expr = evaluator.compile(source).unwrap();
            let error = evaluator.eval(&expr, &scope).unwrap_err().to_string();
            assert!(error.contains(refusal), "{source}: {error}");
        }
        // An empty text stays as it is, as with the package's replace.
        let expr = evaluator.compile(r#"[input.e.replace("", "x"), input.e]"#).unwrap();
        assert_eq!(evaluator.eval(&expr, &scope).unwrap(), json!([null, ""]));
        let expr = evaluator.compile(r#"[[1, 2], [3]].map("len")"#).unwrap();
        assert_eq!(evaluator.eval(&expr, &scope).unwrap(), json!([2, 1]));
        let expr = evaluator.compile(r#"[[3, 1, 2].reduce("max", 0), [3, 1, 2].reduce_rev("min", 9)]"#).unwrap();
        assert_eq!(evaluator.eval(&expr, &scope).unwrap(), json!([3, 1]));
    }

    #[test]
    fn bounded_functions_give_what_the_package_s_give() {
        let text = r#""hello, world! hello, foo!""#;
        let cases = [
            (format!("{text}.split()"), json!(["hello,", "world!", "hello,", "foo!"])),
            (format!(r#"{text}.split("ll")"#), json!(["he", "o, world! he", "o, foo!"])),
            (format!(r#"{text}.split("ll", 2)"#), json!(["he", "o, world! hello, foo!"])),
            (format!("{text}.split('l')"), json!(["he", "", "o, wor", "d! he", "", "o, foo!"])),
            (format!("{text}.split('l', 3)"), json!(["he", "", "o, world! hello, foo!"])),
            (format!(r#"{text}.split_rev("ll")"#), json!(["o, foo!", "o, world! he", "he"])),
            (format!(r#"{text}.split_rev("ll", 2)"#), json!(["o, foo!", "hello, world! he"])),
            (format!("{text}.split_rev('l')"), json!(["o, foo!", "", "d! he", "o, wor", "", "he"])),
            (format!("{text}.split_rev('l', 3)"), json!(["o, foo!", "", "hello, world! he"])),
            (format!("{text}.split(5)"), json!(["hello", ", world! hello, foo!"])),
            (r#""".split(",")"#.to_owned(), json!([""])),
            (r#""abc".split("x")"#.to_owned(), json!(["abc"])),
            (r#""abc".split("")"#.to_owned(), json!(["", "a", "b", "c", ""])),
            (r#""ab".to_chars()"#.to_owned(), json!(["a", "b"])),
            ("#{a: 1, b: 2}.map(|k| this * 2)".to_owned(), json!({"a": 2, "b": 4})),
            ("#{a: 1, bb: 2}.map(|k, v| v + k.len())".to_owned(), json!({"a": 2, "bb": 4})),
        ];
        for (source, expected) in cases {
            assert_eq!(eval_plain(&source), expected, "{source}");
        }
    }

    #[test]
    fn a_prepared_scope_gives_what_a_fresh_one_gives_and_no_evaluation_changes_it() {
        let evaluator = evaluator();
        let input = json!({"items": [1, 2, 3], "k": 1, "s": "a-b", "o": {"x": [1]}});
        let steps = json!({"fetch": {"status": "succeeded", "output": {"n": 5}}});
        let sources = [
            "#{v: item, k: input.k, i: index}",
            "input.items[input.k] + item",
            "input.items.map(|x| x * 2).len() + steps.fetch.output.n",
            "input.items.filter(|x| x > input.k).len()",
            "[input.o, input.o.x, input.items.len()]",
            "input.items.map(|x| x + item + input.k)",
            "[input.items.contains(2), input.items.index_of(3), input.o.keys(), input.o.values()]",
            "[input.s.to_upper(), input.s.sub_string(1), input.s.len(), input.s.index_of('-')]",
            "input.items.reduce(|a, x| a + x, 0) + input.items.filter(|x| x > 1).len()",
            "[input.items.some(|x| x > 2), input.items.all(|x| x > 0), input.items.find(|x| x > 1)]",
            "input.items.zip([5, 6], |a, b| a + b)",
        ];
        for source in sources {
            let expr = evaluator.compile(source).unwrap();
            let scope = Scope { input: Some(&input), steps: steps.as_object(), ..Scope::default() };
            assert!(expr.preparable(), "{source}");
            let prepared = evaluator.prepare(&expr, &scope).unwrap().unwrap();
            for (index, item) in [json!(10), json!(20)].iter().enumerate() {
                let fresh = Scope { item: Some(item), index: Some(index as u32), ..scope };
                let expected = evaluator.eval(&expr, &fresh).unwrap_or_else(|error| panic!("{source}: {error}"));
                let got = evaluator.eval_prepared(&expr, &prepared, Some(item), Some(index as u32));
                assert_eq!(got.unwrap_or_else(|error| panic!("{source}: {error}")), expected, "{source}");
            }
        }
        // An expression that calls a function Rhai refuses on a read-only value (one that
        // changes it, or copies out of it as `get` does) is not prepared: it is evaluated as
        // it always was, its variables its own.
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for (source, expected) in [
            ("input.items.get(-1)", json!(3)),
            ("input.items.extract(1)", json!([2, 3])),
            ("input.items.order_desc()", json!([3, 2, 1])),
            ("input.items.pop()", json!(3)),
            (r#"input.s.split("-")"#, json!(["a", "b"])),
            ("[1].map(curry(|a, x| a.k + x, input))", json!([2])),
            (r#"input.items.map("to_string")"#, json!(["1", "2", "3"])),
            (r#"[input.o.x].map(Fn("pop"))"#, json!([1])),
            (r#"input.items.index_of("clear")"#, json!(-1)),
        ] {
            let expr = evaluator.compile(source).unwrap();
            assert!(!expr.preparable(), "{source}");
            assert!(evaluator.prepare(&expr, &scope).unwrap().is_none(), "{source}");
            assert_eq!(evaluator.eval(&expr, &scope).unwrap(), expected, "{source}");
        }
        // Should one reach a prepared variable all the same, it is refused, not seen by the
        // next item.
        let read = evaluator.compile("[input.items, input.s, input.o]").unwrap();
        let prepared = evaluator.prepare(&read, &scope).unwrap().unwrap();
        let pushes = Expr { preparable: true, ..evaluator.compile("input.items.push(4)").unwrap() };
        let error = evaluator.eval_prepared(&pushes, &prepared, None, None).unwrap_err().to_string();
        assert!(error.contains("constant"), "{error}");
        assert_eq!(
            evaluator.eval_prepared(&read, &prepared, None, None).unwrap(),
            json!([[1, 2, 3], "a-b", {"x": [1]}])
        );
    }

    #[test]
    fn values_whose_text_adds_up_past_a_payload_are_read() {
        // A map step's merged outputs are one value: three of 400,000 bytes each are
        // within the default bound, though more than a payload together.
        let text = "x".repeat(400_000);
        let steps = json!({"m": {"status": "succeeded", "output": [text, text, text]}});
        let scope = Scope { steps: steps.as_object(), ..Scope::default() };
        assert_eq!(eval("steps.m.output.len()", &scope).unwrap(), json!(3));
        assert_eq!(eval("steps.m.output.map(|s| s.len()).reduce(|a, b| a + b, 0)", &scope).unwrap(), json!(1_200_000));
    }

    #[test]
    fn overlong_source_is_refused() {
        let limits = Limits { expression_bytes_max: 10, ..Limits::default() };
        let error = Evaluator::new(&limits).compile("1 + 2 + 3 + 4").unwrap_err();
        assert!(error.to_string().contains("over the limit of 10 bytes"), "{error}");
    }

    #[test]
    fn unknown_variable_is_an_eval_error() {
        match eval("nope + 1", &Scope::default()) {
            Err(ExprError::Eval { message, .. }) => assert!(message.contains("unknown variable `nope`"), "{message}"),
            other => panic!("expected an eval error, got {other:?}"),
        }
        // `item` exists only where the step provides it.
        assert!(matches!(eval("item", &Scope::default()), Err(ExprError::Eval { .. })));
    }

    #[test]
    fn non_finite_numbers_are_eval_errors() {
        // Where NaN or infinity is made, not only in the result: a condition that compares
        // one, or an integer made of one, would go on with a value no input holds.
        let input = json!({"done": 3.0, "total": 0.0, "zero": 0.0, "inf": "inf"});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for source in [
            "0.0 / 0.0",
            "#{a: [1.0 / 0.0]}",
            "1.0 / 0.0 > 0.5",
            "(0.0 / 0.0).to_int()",
            "input.done / input.total > 0.5",
            "input.zero / input.total == input.zero / input.total",
            "1 / input.zero",
            "input.done % 0",
            "1.0e308 * 10.0 > 0.0",
            "10.0 ** 400",
            "(-1.0).sqrt() > 0.0",
            "input.zero.ln()",
            "input.inf.parse_float()",
            r#""NaN".parse_float()"#,
        ] {
            match eval(source, &scope) {
                Err(ExprError::Eval { message, .. }) => {
                    assert!(message.contains("not a finite number"), "{source}: {message}")
                }
                other => panic!("{source}: expected an eval error, got {other:?}"),
            }
        }
        // Finite floats work as before, mixed with integers too.
        let cases = [
            ("7.0 / 2", json!(3.5)),
            ("1 - 0.5", json!(0.5)),
            ("2.0 ** 3", json!(8.0)),
            ("7.5 % 2", json!(1.5)),
            ("input.done / 2.0 > 1.0", json!(true)),
            ("(2.7).to_int()", json!(2)),
            (r#""1.5".parse_float() * 2"#, json!(3.0)),
            ("4.0.sqrt() + 0.0.exp()", json!(3.0)),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &scope).unwrap_or_else(|error| panic!("{source}: {error}")), expected, "{source}");
        }
    }

    #[test]
    fn a_time_before_1970_given_as_a_number_goes_on_at_once() {
        let evaluator = evaluator();
        for source in ["-1", "-1.5", "0", r#""1969-12-31T23:59:59Z""#] {
            let expr = evaluator.compile(source).unwrap();
            let waited = evaluator.eval_wait_until(&expr, &Scope::default(), 1_000);
            assert_eq!(waited.unwrap_or_else(|error| panic!("{source}: {error}")), 0, "{source}");
        }
        let expr = evaluator.compile("1500").unwrap();
        assert_eq!(evaluator.eval_wait_until(&expr, &Scope::default(), 1_000).unwrap(), 500);
    }

    #[test]
    fn padding_with_an_empty_text_is_refused_not_looped_over() {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let evaluator = evaluator();
            let input = json!({"code": "x", "fill": ""});
            let scope = Scope { input: Some(&input), ..Scope::default() };
            for source in [r#""x".pad(10, "")"#, "input.code.pad(8, input.fill)"] {
                let outcome = evaluator.eval(&evaluator.compile(source).unwrap(), &scope);
                let _ = sender.send((source, outcome.map_err(|error| error.to_string())));
            }
        });
        for _ in 0..2 {
            let (source, outcome) =
                receiver.recv_timeout(std::time::Duration::from_secs(5)).expect("the evaluation ends");
            let error = outcome.expect_err(source);
            assert!(error.contains("pad needs a non-empty padding"), "{source}: {error}");
        }
        // A padding that is needed nowhere is no error, and one that is pads as the package's.
        let input = json!({"code": "12345", "fill": ""});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for (source, expected) in [
            (r#"[input.code.pad(3, input.fill), input.code]"#, json!([null, "12345"])),
            (r#"[input.code.pad(9, "ab"), input.code]"#, json!([null, "12345abab"])),
            (r#"[input.code.pad(10, "ab"), input.code]"#, json!([null, "12345ababa"])),
            (r#"[input.code.pad(7, "😀"), input.code]"#, json!([null, "12345😀😀"])),
            (r#"[input.code.pad(7, '-'), input.code]"#, json!([null, "12345--"])),
            (r#"[input.code.pad(-1, "ab"), input.code]"#, json!([null, "12345"])),
        ] {
            assert_eq!(eval(source, &scope).unwrap_or_else(|error| panic!("{source}: {error}")), expected, "{source}");
        }
    }

    #[test]
    fn values_a_function_pointer_holds_count_toward_the_bounds() {
        let evaluator = Evaluator::new(&Limits { map_items_max: 10, ..Limits::default() });
        for (source, refusal) in [
            ("[].pad(10, curry(|b| b, [1, 2, 3]))", "the array pad makes exceeds the size limit"),
            ("[1, 2].map(|x| curry(|b| b, [1, 2, 3, 4, 5, 6])).len()", "the array map makes exceeds the size limit"),
            (
                "[1, 2, 3].reduce(|acc, x| acc + [curry(|b| b, [1, 2, 3, 4])], []).len()",
                "the value reduce makes exceeds the size limit",
            ),
        ] {
            let expr = evaluator.compile(source).unwrap();
            let error = evaluator.eval(&expr, &Scope::default()).unwrap_err().to_string();
            assert!(error.contains(refusal), "{source}: {error}");
        }
        // Within the bounds they are made as before (`pad` changes its array, and gives `()`).
        let input = json!({"a": [0]});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        for (source, expected) in [
            ("[input.a.pad(3, curry(|b| b, [1])), input.a.len()]", json!([null, 3])),
            ("[1, 2].map(|x| curry(|b| b, [x])).len()", json!(2)),
        ] {
            let expr = evaluator.compile(source).unwrap();
            assert_eq!(evaluator.eval(&expr, &scope).unwrap(), expected, "{source}");
        }
    }

    #[test]
    fn conditions_must_be_booleans() {
        let evaluator = evaluator();
        let expr = evaluator.compile("1 + 1").unwrap();
        assert!(matches!(evaluator.eval_bool(&expr, &Scope::default()), Err(ExprError::Type { .. })));
    }

    #[test]
    fn evaluator_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Evaluator>();
        assert_send_sync::<Expr>();
    }

    #[test]
    fn reads_input_is_recorded_also_through_closures() {
        let evaluator = Evaluator::new(&Limits::default());
        assert!(!evaluator.compile("#{ value: item }").unwrap().reads_input);
        assert!(evaluator.compile("input.items.len()").unwrap().reads_input);
        let captured = evaluator.compile("[1, 2].map(|x| x + input.k)").unwrap();
        assert!(captured.reads_input);
        let input = serde_json::json!({"k": 10});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        assert_eq!(evaluator.eval(&captured, &scope).unwrap(), serde_json::json!([11, 12]));
    }
}

#[cfg(test)]
mod closure_tests {
    use super::*;

    #[test]
    fn a_value_a_closure_nests_through_what_it_captured_ends_in_an_error_on_an_evaluation_stack() {
        // One level per operation at most, for as long as the budget lasts: a thread of
        // EVALUATION_STACK_BYTES walks and drops it (a default thread's stack overflowed).
        // (A closure's own parameter captured by a closure in it nests the same way, fewer
        // levels a call: a closure's body may nest less.)
        let wrap = |levels: usize, inner: &str| format!("{}{inner}{}", "[".repeat(levels), "]".repeat(levels));
        let sources = [format!("input.a.map(|x| input.acc.push({})).len()", wrap(16, "input.acc.split(0)"))];
        let evaluate = move || {
            let evaluator = Evaluator::new(&Limits::default());
            let input = serde_json::json!({"a": vec![0; 30_000], "acc": []});
            let scope = Scope { input: Some(&input), ..Scope::default() };
            sources
                .iter()
                .map(|source| evaluator.eval(&evaluator.compile(source).unwrap(), &scope).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        };
        let thread = std::thread::Builder::new().stack_size(EVALUATION_STACK_BYTES).spawn(evaluate).unwrap();
        for outcome in thread.join().expect("the evaluation's thread ends") {
            let error = outcome.expect_err("a value nested past the budget's reach is an error");
            assert!(error.contains("budget of 100000 operations"), "{error}");
        }
    }

    #[test]
    fn a_closure_reads_the_variable_whose_list_it_walks() {
        let evaluator = Evaluator::new(&Limits::default());
        let input = serde_json::json!({"arr": [1, 2, 3], "k": 1});
        let steps = serde_json::json!({"a": {"output": [1, 2]}});
        let scope = Scope { input: Some(&input), steps: steps.as_object(), ..Scope::default() };
        let cases = [
            ("input.arr.map(|x| x + input.k)", serde_json::json!([2, 3, 4])),
            ("input.arr.filter(|x| x > input.k)", serde_json::json!([2, 3])),
            ("input.arr.reduce(|s, x| s + x + input.k, 0)", serde_json::json!(9)),
            ("steps.a.output.map(|x| x + steps.a.output.len())", serde_json::json!([3, 4])),
            (
                "steps.a.output.map(|x| x * input.k) + input.arr.filter(|x| x > input.k)",
                serde_json::json!([1, 2, 2, 3]),
            ),
        ];
        for (source, expected) in cases {
            let expr = evaluator.compile(source).unwrap();
            assert_eq!(evaluator.eval(&expr, &scope).unwrap_or_else(|error| panic!("{source}: {error}")), expected);
        }
        // The one case left: a closure in a closure over the same variable, refused with a way out.
        let nested = evaluator.compile("input.arr.map(|x| input.arr.filter(|y| y < x + input.k).len())").unwrap();
        let error = evaluator.eval(&nested, &scope).unwrap_err().to_string();
        assert!(error.contains("a closure inside a closure reads the variable the outer one walks"), "{error}");
    }

    #[test]
    fn a_field_named_as_a_keyword_is_read_with_brackets_as_the_error_says() {
        let evaluator = Evaluator::new(&Limits::default());
        // A step whose id only starts with the keyword, or a field named `steps`, is no step
        // to rename.
        for source in ["input.go + 1", "steps.gone.output + input.go", "input.steps.go"] {
            let keyword = evaluator.compile(source).unwrap_err().to_string();
            assert!(
                keyword.contains(r#"read a field named so with brackets, e.g. input["go"]"#),
                "{source}: {keyword}"
            );
            assert!(!keyword.contains("another id"), "{source}: {keyword}");
        }
        let step = evaluator.compile("input.x + steps.go.output").unwrap_err().to_string();
        assert!(step.contains("give step `go` another id"), "{step}");
        let bracketed = evaluator.compile(r#"input["go"]"#).unwrap();
        let input = serde_json::json!({"go": 7});
        let scope = Scope { input: Some(&input), ..Scope::default() };
        assert_eq!(evaluator.eval(&bracketed, &scope).unwrap(), serde_json::json!(7));
    }
}
