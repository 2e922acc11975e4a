//! MiniJinja templates inside workflow values, compiled once per workflow.
//!
//! Every string in a step's `input`, `config`, `if`, `for_each` and in
//! `[output]` is a template. A string that is exactly one `{{ expr }}`
//! (whitespace around it allowed) yields the expression's value as JSON, so
//! `"{{ steps.parse.output.items }}"` passes a list on, not its text; any other
//! string renders to text. Inside text, booleans, `none`, lists and maps print
//! as JSON (`true`, `null`, `[1, 2]`), so text built from step outputs reads
//! the way the outputs were written.
//!
//! A string with no `{{`, `{%` or `{#` is not a template; to pass those
//! characters on literally, write `{% raw %}{{ like this }}{% endraw %}`.
//!
//! Undefined values are errors (MiniJinja's strict mode), reported with the
//! path that is missing, e.g. "`input.itemz` is undefined; `input` has keys:
//! items".
//!
//! In scope: `input`, `steps.<id>.output`, `steps.<id>.status`, `run.id`,
//! `run.workflow`, and inside a `for_each` step `item` and `index`. A [`Scope`]
//! holds them as MiniJinja values (reference counted), so extending it per
//! item or per finished step does not copy what is already there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use minijinja::machinery::Instructions;
use minijinja::value::{DynObject, Enumerator, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, context};
use serde_json::Value as Json;

use super::bounds::{self, Bound};
use super::readable::Readable;

/// The variable a single-expression template assigns its value to.
const RESULT: &str = "__trellis_value";

/// The names a template can read; anything else is a typo (or a global
/// function such as `range`).
pub(crate) const SCOPE_NAMES: [&str; 5] = ["input", "steps", "run", "item", "index"];

/// Every template of one workflow, compiled, and its code rewritten once
/// to run within the bounds of the `bounds` module. `Send + Sync`.
pub struct Templates {
    compiled: Bounded,
}

/// Template name -> its rewritten code, borrowing from the environment.
struct Rewritten<'env>(HashMap<String, Instructions<'env>>);

self_cell::self_cell!(
    struct Bounded {
        owner: Environment<'static>,
        #[covariant]
        dependent: Rewritten,
    }
);

impl Bounded {
    fn rewrite(env: Environment<'static>) -> Bounded {
        Bounded::new(env, |env| {
            Rewritten(
                env.templates()
                    .map(|(name, template)| {
                        let code =
                            &minijinja::machinery::get_compiled_template(&template).instructions;
                        (name.to_owned(), bounds::rewrite(code))
                    })
                    .collect(),
            )
        })
    }
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("count", &self.compiled.borrow_dependent().0.len())
            .finish()
    }
}

impl Default for Templates {
    /// No templates: renders only literal values.
    fn default() -> Self {
        Templates {
            compiled: Bounded::rewrite(new_environment()),
        }
    }
}

/// A value from the workflow whose strings may be templates.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateValue {
    /// No template inside: used as it is.
    Literal(Json),
    /// A string that is exactly one `{{ expr }}`: renders to the expression's
    /// value as JSON.
    Expression(CompiledTemplate),
    /// Any other string with template syntax: renders to a string.
    Text(CompiledTemplate),
    /// A list with a template somewhere inside.
    Array(Vec<TemplateValue>),
    /// A table with a template somewhere inside.
    Object(Vec<(String, TemplateValue)>),
}

impl Default for TemplateValue {
    fn default() -> Self {
        TemplateValue::Literal(Json::Null)
    }
}

impl TemplateValue {
    /// `Some` when nothing in this value is a template.
    pub fn as_literal(&self) -> Option<&Json> {
        match self {
            TemplateValue::Literal(value) => Some(value),
            _ => None,
        }
    }

    /// The first template inside, if any.
    fn first_template(&self) -> Option<&CompiledTemplate> {
        match self {
            TemplateValue::Literal(_) => None,
            TemplateValue::Expression(template) | TemplateValue::Text(template) => Some(template),
            TemplateValue::Array(items) => items.iter().find_map(TemplateValue::first_template),
            TemplateValue::Object(entries) => {
                entries.iter().find_map(|(_, value)| value.first_template())
            }
        }
    }
}

/// The value as written, as compact JSON (templates as their source strings).
impl fmt::Display for TemplateValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateValue::Literal(value) => write!(f, "{value}"),
            TemplateValue::Expression(template) | TemplateValue::Text(template) => {
                write!(f, "{}", Json::String(template.source().to_owned()))
            }
            TemplateValue::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            TemplateValue::Object(entries) => {
                f.write_str("{")?;
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{value}", Json::String(key.clone()))?;
                }
                f.write_str("}")
            }
        }
    }
}

/// One compiled template: a handle into the [`Templates`] that compiled it.
#[derive(Clone)]
pub struct CompiledTemplate(Arc<TemplateInfo>);

struct TemplateInfo {
    /// Name in the environment.
    name: String,
    /// Where it is in the workflow, e.g. "step `fetch` input.items".
    field: String,
    /// As written.
    source: String,
    /// Dotted paths it reads from the scope (`input.items`, `steps.a.output`),
    /// to say which one is undefined when rendering fails.
    paths: Vec<String>,
}

impl CompiledTemplate {
    /// The template as written in the workflow.
    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// Where the template is, e.g. "step `fetch` input.items".
    pub fn field(&self) -> &str {
        &self.0.field
    }
}

impl fmt::Debug for CompiledTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.source(), f)
    }
}

impl PartialEq for CompiledTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name && self.0.source == other.0.source
    }
}

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template reads a value that does not exist.
    #[error("{field}: `{template}`: {reason}")]
    Undefined {
        field: String,
        template: String,
        reason: String,
    },
    /// Evaluation failed: a type error, an unknown filter, a value that is not JSON...
    #[error("{field}: `{template}`: {reason}")]
    Failed {
        field: String,
        template: String,
        reason: String,
    },
    /// Evaluation went over one of the bounds on time and memory that every
    /// template evaluation has (kind `template_limit`; see the `bounds` module).
    #[error("{field}: `{template}`: {reason}")]
    Limit {
        field: String,
        template: String,
        reason: String,
        bound: Bound,
    },
    /// `for_each` rendered to something other than a list.
    #[error("{field}: `{template}` must give a list, but gave {got}")]
    NotAList {
        field: String,
        template: String,
        got: String,
    },
}

/// What templates can read while a run goes on. Cheap to clone and to extend.
#[derive(Clone, Debug)]
pub struct Scope {
    input: Value,
    run: Value,
    steps: Arc<BTreeMap<String, Value>>,
    /// For one step's templates: the steps they may read. `None`: all of them
    /// (`[output]`, which is rendered once every step is done).
    readable: Option<Readable>,
    item: Option<(Value, usize)>,
}

impl Scope {
    /// The scope at the start of a run: `input`, `run.id`, `run.workflow`.
    pub fn new(run_id: &str, workflow: &str, input: &Json) -> Scope {
        Scope {
            input: Value::from_serialize(input),
            run: context! { id => run_id, workflow => workflow },
            steps: Arc::default(),
            readable: None,
            item: None,
        }
    }

    /// Records a finished (or skipped) step: `steps.<id>.status` and
    /// `steps.<id>.output` become readable.
    pub fn set_step(&mut self, id: &str, status: &str, output: &Json) {
        let step = context! { status => status, output => Value::from_serialize(output) };
        Arc::make_mut(&mut self.steps).insert(id.to_owned(), step);
    }

    /// This scope as one step sees it: only the steps in `readable` (those it
    /// needs, directly or not), whatever else has finished by the time it
    /// starts.
    pub fn for_step(&self, readable: Readable) -> Scope {
        Scope {
            readable: Some(readable),
            ..self.clone()
        }
    }

    /// This scope with `item` and `index` for one instance of a `for_each` step.
    pub fn with_item(&self, item: &Json, index: usize) -> Scope {
        Scope {
            item: Some((Value::from_serialize(item), index)),
            ..self.clone()
        }
    }

    fn lookup(&self, name: &str) -> Option<Value> {
        match name {
            "input" => Some(self.input.clone()),
            "run" => Some(self.run.clone()),
            "steps" => Some(match &self.readable {
                None => Value::from_dyn_object(DynObject::new(self.steps.clone())),
                Some(readable) => Value::from_object(ReadableSteps {
                    steps: self.steps.clone(),
                    readable: readable.clone(),
                }),
            }),
            "item" => self.item.as_ref().map(|(item, _)| item.clone()),
            "index" => self.item.as_ref().map(|(_, index)| Value::from(*index)),
            _ => None,
        }
    }

    fn to_value(&self) -> Value {
        Value::from_object(self.clone())
    }
}

impl Object for Scope {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.lookup(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.lookup(key)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let names: &'static [&'static str] = if self.item.is_some() {
            &SCOPE_NAMES
        } else {
            &SCOPE_NAMES[..3]
        };
        Enumerator::Str(names)
    }
}

/// `steps` as one step's templates see it: the finished steps it may read.
#[derive(Debug)]
struct ReadableSteps {
    steps: Arc<BTreeMap<String, Value>>,
    readable: Readable,
}

impl Object for ReadableSteps {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let id = key.as_str()?;
        if self.readable.allows(id) {
            self.steps.get(id).cloned()
        } else {
            None
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let ids = self
            .steps
            .keys()
            .filter(|id| self.readable.allows(id))
            .map(|id| Value::from(id.as_str()));
        Enumerator::Values(ids.collect())
    }
}

impl Templates {
    /// The value with every template in it rendered.
    pub fn render(&self, value: &TemplateValue, scope: &Scope) -> Result<Json, TemplateError> {
        self.render_value(value, &scope.to_value())
    }

    /// Whether an `if` holds. JSON `false`, `null`, `0`, `""`, `[]` and `{}` are
    /// false; so is text (a string that is not a single `{{ expr }}`) that is,
    /// trimmed, empty, `false` (any case) or `0`. Everything else is true.
    pub fn truthy(&self, value: &TemplateValue, scope: &Scope) -> Result<bool, TemplateError> {
        let context = scope.to_value();
        Ok(match value {
            TemplateValue::Literal(Json::String(text)) => text_truthy(text),
            TemplateValue::Text(template) => text_truthy(&self.render_text(template, &context)?),
            other => json_truthy(&self.render_value(other, &context)?),
        })
    }

    /// The items of a `for_each`: the value must render to a JSON list.
    pub fn render_list(
        &self,
        value: &TemplateValue,
        scope: &Scope,
    ) -> Result<Vec<Json>, TemplateError> {
        match self.render(value, scope)? {
            Json::Array(items) => Ok(items),
            other => {
                let (field, template) = match value.first_template() {
                    Some(template) => (template.field().to_owned(), template.source().to_owned()),
                    None => ("for_each".to_owned(), value.to_string()),
                };
                Err(TemplateError::NotAList {
                    field,
                    template,
                    got: describe_json(&other),
                })
            }
        }
    }

    fn render_value(&self, value: &TemplateValue, context: &Value) -> Result<Json, TemplateError> {
        match value {
            TemplateValue::Literal(value) => Ok(value.clone()),
            TemplateValue::Expression(template) => {
                let value = self.evaluate(template, context)?;
                to_json(&value).map_err(|error| self.conversion_error(template, context, error))
            }
            TemplateValue::Text(template) => self.render_text(template, context).map(Json::String),
            TemplateValue::Array(items) => items
                .iter()
                .map(|item| self.render_value(item, context))
                .collect::<Result<_, _>>()
                .map(Json::Array),
            TemplateValue::Object(entries) => entries
                .iter()
                .map(|(key, value)| Ok((key.clone(), self.render_value(value, context)?)))
                .collect::<Result<_, _>>()
                .map(Json::Object),
        }
    }

    /// The value of a single-expression template.
    fn evaluate(
        &self,
        template: &CompiledTemplate,
        context: &Value,
    ) -> Result<Value, TemplateError> {
        let mut ignored = String::new();
        let value = self
            .run(template, context, &mut ignored)
            .map_err(|(error, bound)| self.render_error(template, context, error, bound))?;
        if value.is_undefined() {
            return Err(self.undefined(template, context));
        }
        // A lazy value (a filter's or an operator's result) is weighed before
        // it is turned into JSON; lists and maps were weighed when they were
        // built or came from the run as JSON, so they are not walked twice.
        if value.kind() == ValueKind::Iterable {
            let (weighed, bound) = bounds::evaluate(|| {
                bounds::weigh(&value, bounds::MAX_VALUE, "the value of the template")
            });
            weighed.map_err(|error| self.limit(template, &error, bound.unwrap_or(Bound::Value)))?;
        }
        Ok(value)
    }

    fn render_text(
        &self,
        template: &CompiledTemplate,
        context: &Value,
    ) -> Result<String, TemplateError> {
        let mut text = String::new();
        self.run(template, context, &mut text)
            .map_err(|(error, bound)| self.render_error(template, context, error, bound))?;
        Ok(text)
    }

    fn run(
        &self,
        template: &CompiledTemplate,
        context: &Value,
        text: &mut String,
    ) -> Result<Value, (minijinja::Error, Option<Bound>)> {
        let env = self.compiled.borrow_owner();
        match self.compiled.borrow_dependent().0.get(&template.0.name) {
            Some(code) => run_code(env, code, context, text),
            None => Err((
                minijinja::Error::new(ErrorKind::TemplateNotFound, template.0.name.clone()),
                None,
            )),
        }
    }

    fn render_error(
        &self,
        template: &CompiledTemplate,
        context: &Value,
        error: minijinja::Error,
        bound: Option<Bound>,
    ) -> TemplateError {
        if let Some(bound) = bound {
            return self.limit(template, &error, bound);
        }
        // `{{ input.x + 1 }}` with `x` missing fails as an invalid operation
        // on undefined, not as an undefined error: explain both the same way.
        let undefined_involved = error.kind() == ErrorKind::UndefinedError
            || error
                .detail()
                .is_some_and(|detail| detail.contains("undefined"));
        if undefined_involved && let Some(reason) = explain_undefined(&template.0.paths, context) {
            return TemplateError::Undefined {
                field: template.field().to_owned(),
                template: template.source().to_owned(),
                reason,
            };
        }
        let mut reason = match error.detail() {
            Some(detail) => format!("{}: {detail}", error.kind()),
            None => error.kind().to_string(),
        };
        if error.kind() == ErrorKind::TemplateNotFound {
            reason = "the template belongs to another workflow".to_owned();
        }
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        TemplateError::Failed {
            field: template.field().to_owned(),
            template: template.source().to_owned(),
            reason,
        }
    }

    fn limit(
        &self,
        template: &CompiledTemplate,
        error: &minijinja::Error,
        bound: Bound,
    ) -> TemplateError {
        // MiniJinja's own errors (fuel, a range) do not name the bound.
        let named = bound.to_string();
        let detail = match error.detail() {
            Some(detail) if detail.contains(&named) => detail.to_owned(),
            Some(detail) => format!("{detail}: over {named}"),
            None => format!("over {named}"),
        };
        TemplateError::Limit {
            field: template.field().to_owned(),
            template: template.source().to_owned(),
            reason: format!("template_limit: {detail}"),
            bound,
        }
    }

    fn conversion_error(
        &self,
        template: &CompiledTemplate,
        context: &Value,
        error: ConversionError,
    ) -> TemplateError {
        match error {
            ConversionError::Undefined => self.undefined(template, context),
            ConversionError::NotJson(kind) => TemplateError::Failed {
                field: template.field().to_owned(),
                template: template.source().to_owned(),
                reason: format!("the value is a {kind}, which has no JSON form"),
            },
        }
    }

    fn undefined(&self, template: &CompiledTemplate, context: &Value) -> TemplateError {
        TemplateError::Undefined {
            field: template.field().to_owned(),
            template: template.source().to_owned(),
            reason: explain_undefined(&template.0.paths, context)
                .unwrap_or_else(|| "a value it reads is undefined".to_owned()),
        }
    }
}

/// Runs template `name` of `env` within the bounds of one evaluation (see
/// [`super::bounds`]): what it prints goes to `text`; the value of a
/// single-expression template is returned. On an error, the bound it went
/// over, if that is why.
fn run_template(
    env: &Environment<'static>,
    name: &str,
    context: &Value,
    text: &mut String,
) -> Result<Value, (minijinja::Error, Option<Bound>)> {
    let compiled = env.get_template(name).map_err(|error| (error, None))?;
    let code =
        bounds::rewrite(&minijinja::machinery::get_compiled_template(&compiled).instructions);
    run_code(env, &code, context, text)
}

/// Runs `code`, rewritten by [`bounds::rewrite`], as [`run_template`] does.
fn run_code(
    env: &Environment<'static>,
    code: &Instructions<'_>,
    context: &Value,
    text: &mut String,
) -> Result<Value, (minijinja::Error, Option<Bound>)> {
    use minijinja::machinery::{Vm, make_string_output};
    // Blocks are refused by `bounds::check`: there are none.
    let blocks = BTreeMap::new();
    let (result, bound) = bounds::evaluate(|| {
        let mut out = make_string_output(text);
        Vm::new(env)
            .eval(code, context.clone(), &blocks, &mut out, AutoEscape::None)
            .map(|(_, state)| state.lookup(RESULT).unwrap_or_default())
    });
    result.map_err(|error| {
        let bound = bound.or_else(|| bounds::bound_of(&error));
        (error, bound)
    })
}

/// The range of the first name in `text` that starts with
/// [`bounds::RESERVED_PREFIX`], which a template could otherwise use to
/// replace an operator.
fn reserved_name(text: &str) -> Option<Range<usize>> {
    use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
    #[allow(clippy::default_constructed_unit_structs)]
    tokenize(
        text,
        false,
        minijinja::syntax::SyntaxConfig::default(),
        WhitespaceConfig::default(),
    )
    .map_while(Result::ok)
    .find_map(|(token, span)| match token {
        Token::Ident(name) if name.starts_with(bounds::RESERVED_PREFIX) => {
            Some(span.start_offset as usize..span.end_offset as usize)
        }
        _ => None,
    })
}

/// Says which of `paths` (dotted, as the template reads them) is undefined in
/// `context`, and what is there instead.
fn explain_undefined(paths: &[String], context: &Value) -> Option<String> {
    for path in paths {
        let segments: Vec<&str> = path.split('.').collect();
        let mut current = context.clone();
        for (i, segment) in segments.iter().enumerate() {
            let next = current.get_attr(segment).unwrap_or(Value::UNDEFINED);
            if !next.is_undefined() {
                current = next;
                continue;
            }
            let full = segments[..=i].join(".");
            if i == 0 {
                let hint = match *segment {
                    "item" | "index" => " (only inside a step with `for_each`)",
                    _ => "",
                };
                return Some(format!("`{full}` is undefined{hint}"));
            }
            let parent = segments[..i].join(".");
            let mut reason = match current.kind() {
                ValueKind::Map => {
                    let mut keys: Vec<String> = current
                        .try_iter()
                        .map(|keys| keys.map(|key| key.to_string()).collect())
                        .unwrap_or_default();
                    let more = keys.len() > 12;
                    keys.truncate(12);
                    let keys = if keys.is_empty() {
                        "no keys".to_owned()
                    } else {
                        format!(
                            "keys: {}{}",
                            keys.join(", "),
                            if more { ", ..." } else { "" }
                        )
                    };
                    let forbidden = current
                        .downcast_object_ref::<ReadableSteps>()
                        .is_some_and(|steps| steps.readable.forbids(segment));
                    if forbidden {
                        format!(
                            "`{full}` is undefined: this step does not wait for step \
                             `{segment}`; add it to `needs`"
                        )
                    } else if parent == "steps" {
                        format!("`{full}` is undefined: no step `{segment}` has finished yet")
                    } else {
                        format!("`{full}` is undefined; `{parent}` has {keys}")
                    }
                }
                ValueKind::None => format!("`{full}` is undefined: `{parent}` is null"),
                kind => format!("`{full}` is undefined: `{parent}` is a {kind}"),
            };
            // `steps.x.output.y` where step x did not succeed: say so.
            if let ["steps", id, "output", ..] = segments.as_slice()
                && i >= 3
            {
                let status = context
                    .get_attr("steps")
                    .and_then(|steps| steps.get_attr(id))
                    .and_then(|step| step.get_attr("status"))
                    .ok()
                    .and_then(|status| status.as_str().map(str::to_owned));
                if let Some(status) = status
                    && status != "succeeded"
                {
                    reason.push_str(&format!(" (step `{id}` is {status})"));
                }
            }
            return Some(reason);
        }
    }
    None
}

enum ConversionError {
    Undefined,
    NotJson(ValueKind),
}

/// A MiniJinja value as JSON; undefined anywhere inside is an error.
fn to_json(value: &Value) -> Result<Json, ConversionError> {
    Ok(match value.kind() {
        ValueKind::Undefined => return Err(ConversionError::Undefined),
        ValueKind::None => Json::Null,
        ValueKind::Bool => Json::Bool(value.is_true()),
        ValueKind::String => Json::String(value.as_str().unwrap_or_default().to_owned()),
        ValueKind::Number | ValueKind::Bytes => {
            serde_json::to_value(value).map_err(|_| ConversionError::NotJson(value.kind()))?
        }
        ValueKind::Seq | ValueKind::Iterable => Json::Array(
            value
                .try_iter()
                .map_err(|_| ConversionError::NotJson(value.kind()))?
                .map(|item| to_json(&item))
                .collect::<Result<_, _>>()?,
        ),
        ValueKind::Map => {
            let mut map = serde_json::Map::new();
            for key in value
                .try_iter()
                .map_err(|_| ConversionError::NotJson(value.kind()))?
            {
                let item = value.get_item(&key).unwrap_or(Value::UNDEFINED);
                let key = match key.as_str() {
                    Some(key) => key.to_owned(),
                    None => key.to_string(),
                };
                map.insert(key, to_json(&item)?);
            }
            Json::Object(map)
        }
        // Plain objects (`loop`, macros...), invalid values, and whatever kinds
        // MiniJinja adds later.
        kind => return Err(ConversionError::NotJson(kind)),
    })
}

fn json_truthy(value: &Json) -> bool {
    match value {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(items) => !items.is_empty(),
        Json::Object(map) => !map.is_empty(),
    }
}

fn text_truthy(text: &str) -> bool {
    let text = text.trim();
    !(text.is_empty() || text == "0" || text.eq_ignore_ascii_case("false"))
}

/// "a string \"abc\"", "an object {...}": for error messages.
fn describe_json(value: &Json) -> String {
    let kind = match value {
        Json::Null => return "null".to_owned(),
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    };
    let mut text = value.to_string();
    if text.len() > 60 {
        text.truncate(text.floor_char_boundary(57));
        text.push_str("...");
    }
    format!("{kind} {text}")
}

fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Ranges of errors, so a syntax error points at its column.
    env.set_debug(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // A multi-line string keeps its last newline.
    env.set_keep_trailing_newline(true);
    // Templates run on the executor's threads, outside any sandbox: every
    // evaluation is bounded in time and memory (fuel, and every filter, test
    // and function weighing what it is given).
    bounds::install(&mut env);
    env.set_formatter(|out, state, value| {
        // Everything printed is weighed and counted.
        let text = match value.kind() {
            ValueKind::String => {
                bounds::charge_output(value.as_str().map_or(0, str::len))?;
                return minijinja::escape_formatter(out, state, value);
            }
            ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
                bounds::weigh(value, bounds::MAX_VALUE, "a value printed")?;
                match to_json(value) {
                    Ok(json) => json.to_string(),
                    Err(_) => value.to_string(),
                }
            }
            ValueKind::Iterable => {
                bounds::weigh(value, bounds::MAX_VALUE, "a value printed")?;
                value.to_string()
            }
            // Numbers, undefined (an error in strict mode), objects: short.
            _ => return minijinja::escape_formatter(out, state, value),
        };
        bounds::charge_output(text.len())?;
        out.write_str(&text)
            .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write"))
    });
    env
}

/// Compiles the templates of one workflow into the [`Templates`] of its plan.
pub(crate) struct TemplatesBuilder {
    env: Environment<'static>,
    count: usize,
}

/// A string of the workflow, compiled.
pub(crate) struct CompiledString {
    /// [`TemplateValue::Expression`] or [`TemplateValue::Text`].
    pub value: TemplateValue,
    /// Every dotted path the template reads that it did not assign itself
    /// (`input.items`, `steps.a.output`, `item`, `range`...), sorted.
    pub references: Vec<String>,
}

/// A template that does not parse, or that is refused before it runs.
#[derive(Debug)]
pub(crate) struct TemplateSyntaxError {
    pub kind: CompileErrorKind,
    pub message: String,
    /// Byte range in the template's source.
    pub range: Option<Range<usize>>,
}

/// Why [`TemplatesBuilder::compile`] refused a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompileErrorKind {
    /// It does not parse.
    Syntax,
    /// It uses what workflow templates do not support (see [`super::bounds`]).
    Unsupported,
    /// It reads nothing from the scope, and evaluating it goes over a bound.
    Limit,
}

impl CompileErrorKind {
    /// How a diagnostic names it.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            CompileErrorKind::Syntax => "template syntax error",
            CompileErrorKind::Unsupported => "template error",
            CompileErrorKind::Limit => "template_limit",
        }
    }
}

impl TemplatesBuilder {
    pub(crate) fn new() -> Self {
        TemplatesBuilder {
            env: new_environment(),
            count: 0,
        }
    }

    /// Compiles `text`, found at `field`. `Ok(None)` when it has no template
    /// syntax at all (`{{`, `{%`, `{#`) and is just a string.
    pub(crate) fn compile(
        &mut self,
        text: &str,
        field: &str,
    ) -> Result<Option<CompiledString>, TemplateSyntaxError> {
        if !(text.contains("{{") || text.contains("{%") || text.contains("{#")) {
            return Ok(None);
        }
        // MiniJinja folds constant expressions while it compiles: weigh them
        // before it does.
        if let Err(refused) = bounds::check_constants(text) {
            return Err(TemplateSyntaxError {
                kind: CompileErrorKind::Limit,
                message: refused.message,
                range: refused.range,
            });
        }
        let name = format!("t{}", self.count);
        self.count += 1;
        self.env
            .add_template_owned(name.clone(), text.to_owned())
            .map_err(|error| TemplateSyntaxError {
                kind: CompileErrorKind::Syntax,
                message: match error.detail() {
                    Some(detail) => detail.to_owned(),
                    None => error.kind().to_string(),
                },
                range: error.range(),
            })?;
        if let Some(range) = reserved_name(text) {
            self.env.remove_template(&name);
            return Err(TemplateSyntaxError {
                kind: CompileErrorKind::Unsupported,
                message: format!(
                    "names starting with `{}` are reserved",
                    bounds::RESERVED_PREFIX
                ),
                range: Some(range),
            });
        }
        if let Ok(template) = self.env.get_template(&name) {
            let instructions = &minijinja::machinery::get_compiled_template(&template).instructions;
            if let Err(refused) = bounds::check(instructions) {
                self.env.remove_template(&name);
                return Err(TemplateSyntaxError {
                    kind: CompileErrorKind::Unsupported,
                    message: refused.message,
                    range: refused.range,
                });
            }
        }
        let mut references: BTreeSet<String> = self
            .env
            .get_template(&name)
            .map(|template| template.undeclared_variables(true).into_iter().collect())
            .unwrap_or_default();
        let written = written_paths(text);
        references.extend(
            written
                .iter()
                .filter(|path| path.starts_with("steps."))
                .cloned(),
        );
        let references: Vec<String> = references.into_iter().collect();

        let mut single = single_expression(text).is_some();
        if let Some(expression) = single_expression(text) {
            let assign = format!("{{% set {RESULT} = ({expression}) %}}");
            if self.env.add_template_owned(name.clone(), assign).is_err() {
                // Cannot happen for an expression that parsed inside `{{ }}`;
                // if it does, the string still renders as text.
                single = false;
                let _ = self.env.add_template_owned(name.clone(), text.to_owned());
            }
        }

        let mut paths: Vec<String> = references
            .iter()
            .filter(|path| {
                let root = path.split('.').next().unwrap_or_default();
                SCOPE_NAMES.contains(&root)
            })
            .cloned()
            .collect();
        // Last, so what MiniJinja found (which knows the template's own
        // variables) explains first; these cover what it misses.
        for path in written {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        // A template that reads nothing from the scope gives the same result
        // every run: one over a bound is refused now, not in every run.
        if references
            .iter()
            .all(|path| !SCOPE_NAMES.contains(&path.split('.').next().unwrap_or_default()))
        {
            let mut ignored = String::new();
            let empty = Value::from_object(Scope::new("", "", &Json::Null));
            if let Err((error, Some(bound))) = run_template(&self.env, &name, &empty, &mut ignored)
            {
                self.env.remove_template(&name);
                return Err(TemplateSyntaxError {
                    kind: CompileErrorKind::Limit,
                    message: error
                        .detail()
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("over {bound}")),
                    range: None,
                });
            }
        }
        let template = CompiledTemplate(Arc::new(TemplateInfo {
            name,
            field: field.to_owned(),
            source: text.to_owned(),
            paths,
        }));
        let value = if single {
            TemplateValue::Expression(template)
        } else {
            TemplateValue::Text(template)
        };
        Ok(Some(CompiledString { value, references }))
    }

    /// Whether `name` is one of MiniJinja's global functions (`range`, `dict`...).
    pub(crate) fn is_global(&self, name: &str) -> bool {
        self.env.globals().any(|(global, _)| global == name)
    }

    pub(crate) fn finish(self) -> Templates {
        Templates {
            compiled: Bounded::rewrite(self.env),
        }
    }
}

/// Every path from a scope name (`steps.a.output.x`, `input.n`, `item`...)
/// written in `text`, found by its tokens.
///
/// MiniJinja's `undeclared_variables` does not look inside what a slice is
/// taken of, nor at the arguments of a `{% filter %}` block: for
/// `{{ steps.a.output.digest[:12] }}` it reports nothing (2.24 and 3.1
/// alike), so a step that read another only that way did not wait for
/// it, and an undefined value there was reported without its path. The tokens
/// do not miss it. They do not see scopes either (`{% for item in x %}` binds
/// its own `item`), so they add only `steps.<id>` paths, which no template
/// binds, to a step's references, and the others only to what explains an
/// undefined value.
fn written_paths(text: &str) -> Vec<String> {
    use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
    // A unit struct unless some crate turns on `custom_syntax`; `default()`
    // builds either.
    #[allow(clippy::default_constructed_unit_structs)]
    let tokens: Vec<Token<'_>> = tokenize(
        text,
        false,
        minijinja::syntax::SyntaxConfig::default(),
        WhitespaceConfig::default(),
    )
    .map_while(|token| token.ok().map(|(token, _)| token))
    .collect();
    let mut paths = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        // A scope name as a variable, not as the attribute in `x.steps`.
        let Token::Ident(root) = token else { continue };
        if !SCOPE_NAMES.contains(root) || (at > 0 && matches!(tokens[at - 1], Token::Dot)) {
            continue;
        }
        let mut path = (*root).to_owned();
        let mut next = at + 1;
        while let (Some(Token::Dot), Some(Token::Ident(name))) =
            (tokens.get(next), tokens.get(next + 1))
        {
            path.push('.');
            path.push_str(name);
            next += 2;
        }
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    paths
}

/// The expression of a string that is exactly one `{{ expr }}`, or `None`.
fn single_expression(text: &str) -> Option<&str> {
    let body = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    // Whitespace control: `{{- expr -}}`.
    let body = body.strip_prefix('-').unwrap_or(body);
    let body = body.strip_suffix('-').unwrap_or(body);
    if body.trim().is_empty() {
        return None;
    }
    // Outside string literals, no tag may open or close inside: `{{ a }} {{ b }}`
    // is two expressions. Braces of map literals nest.
    let bytes = body.as_bytes();
    let mut quote = None;
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        let next = bytes.get(i + 1).copied();
        match quote {
            Some(q) => {
                if byte == b'\\' {
                    i += 1;
                } else if byte == q {
                    quote = None;
                }
            }
            None => match (byte, next) {
                (b'"' | b'\'', _) => quote = Some(byte),
                (b'{', Some(b'%' | b'#')) | (b'%' | b'#', Some(b'}')) => return None,
                (b'{', _) => depth += 1,
                (b'}', _) if depth == 0 => return None,
                (b'}', _) => depth -= 1,
                _ => {}
            },
        }
        i += 1;
    }
    (quote.is_none() && depth == 0).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(builder: &mut TemplatesBuilder, text: &str) -> TemplateValue {
        match builder.compile(text, "test").expect("compiles") {
            Some(compiled) => compiled.value,
            None => TemplateValue::Literal(Json::String(text.to_owned())),
        }
    }

    fn render_with(text: &str, scope: &Scope) -> Result<Json, TemplateError> {
        let mut builder = TemplatesBuilder::new();
        // A template that reads nothing and goes over a bound is refused
        // when it is compiled: report that as the limit it is.
        let value = match builder.compile(text, "test") {
            Ok(Some(compiled)) => compiled.value,
            Ok(None) => TemplateValue::Literal(Json::String(text.to_owned())),
            Err(error) if error.kind == CompileErrorKind::Limit => {
                return Err(TemplateError::Limit {
                    field: "test".to_owned(),
                    template: text.to_owned(),
                    reason: error.message,
                    bound: Bound::Value,
                });
            }
            Err(error) => panic!("{text}: does not compile: {error:?}"),
        };
        builder.finish().render(&value, scope)
    }

    /// The bound `text` went over when rendered with `scope`, and its message.
    fn limit_of(text: &str, scope: &Scope) -> (Bound, String) {
        let mut builder = TemplatesBuilder::new();
        let value = compile(&mut builder, text);
        match builder.finish().render(&value, scope) {
            Err(TemplateError::Limit { bound, reason, .. }) => (bound, reason),
            other => panic!("{text}: expected a template_limit error, got {other:?}"),
        }
    }

    fn scope() -> Scope {
        let mut scope = Scope::new(
            "run-1",
            "wf",
            &json!({"items": [1, 2, 3], "n": 3, "user": {"name": "Ada"}, "flag": false}),
        );
        scope.set_step(
            "parse",
            "succeeded",
            &json!({"total": 120.5, "items": ["a", "b"]}),
        );
        scope.set_step("maybe", "skipped", &Json::Null);
        scope
    }

    #[test]
    fn a_single_expression_keeps_its_json_type() {
        let scope = scope();
        assert_eq!(render_with("{{ input.n }}", &scope).unwrap(), json!(3));
        assert_eq!(
            render_with("  {{ input.items }} ", &scope).unwrap(),
            json!([1, 2, 3])
        );
        assert_eq!(
            render_with("{{ input.user }}", &scope).unwrap(),
            json!({"name": "Ada"})
        );
        assert_eq!(
            render_with("{{ input.flag }}", &scope).unwrap(),
            json!(false)
        );
        assert_eq!(
            render_with("{{ steps.maybe.output }}", &scope).unwrap(),
            Json::Null
        );
        assert_eq!(
            render_with("{{ steps.parse.output.total * 2 }}", &scope).unwrap(),
            json!(241.0)
        );
        assert_eq!(
            render_with("{{- input.n + 1 -}}", &scope).unwrap(),
            json!(4)
        );
        assert_eq!(
            render_with("{{ {'a': {'b': input.n}} }}", &scope).unwrap(),
            json!({"a": {"b": 3}})
        );
        assert_eq!(
            render_with("{{ steps.parse.status }}", &scope).unwrap(),
            json!("succeeded")
        );
        assert_eq!(
            render_with("{{ run.id }}/{{ run.workflow }}", &scope).unwrap(),
            json!("run-1/wf")
        );
    }

    #[test]
    fn anything_else_renders_to_text() {
        let scope = scope();
        assert_eq!(
            render_with("n={{ input.n }}", &scope).unwrap(),
            json!("n=3")
        );
        assert_eq!(
            render_with("{{ input.n }}{{ input.n }}", &scope).unwrap(),
            json!("33")
        );
        assert_eq!(
            render_with("{{ input.n }} and {{ input.flag }}", &scope).unwrap(),
            json!("3 and false")
        );
        assert_eq!(
            render_with("items: {{ input.items }}", &scope).unwrap(),
            json!("items: [1,2,3]")
        );
        assert_eq!(render_with("{{ '}}' }}", &scope).unwrap(), json!("}}"));
        assert_eq!(
            render_with("{% for i in input.items %}{{ i }},{% endfor %}", &scope).unwrap(),
            json!("1,2,3,")
        );
        assert_eq!(render_with("line\n", &scope).unwrap(), json!("line\n"));
        assert_eq!(render_with("{{ input.n }}\n", &scope).unwrap(), json!(3));
    }

    #[test]
    fn single_expression_detection() {
        assert_eq!(single_expression("{{ a }}"), Some(" a "));
        assert_eq!(single_expression(" {{a}}\n"), Some("a"));
        assert_eq!(single_expression("{{ a }} {{ b }}"), None);
        assert_eq!(single_expression("{{ a }}{% if x %}{% endif %}"), None);
        assert_eq!(single_expression("{{ '}} {{' }}"), Some(" '}} {{' "));
        assert_eq!(
            single_expression("{{ {'a': {'b': 1}} }}"),
            Some(" {'a': {'b': 1}} ")
        );
        assert_eq!(single_expression("{{ }}"), None);
        assert_eq!(single_expression("x {{ a }}"), None);
    }

    #[test]
    fn undefined_values_name_the_missing_path() {
        let scope = scope();
        let error = render_with("{{ input.itemz }}", &scope).unwrap_err();
        assert!(matches!(error, TemplateError::Undefined { .. }));
        assert_eq!(
            error.to_string(),
            "test: `{{ input.itemz }}`: `input.itemz` is undefined; `input` has keys: flag, items, n, user"
        );
        let error = render_with("total: {{ input.user.age + 1 }}", &scope).unwrap_err();
        assert_eq!(
            error.to_string(),
            "test: `total: {{ input.user.age + 1 }}`: `input.user.age` is undefined; `input.user` has keys: name"
        );
        let error = render_with("{{ steps.maybe.output.x }}", &scope).unwrap_err();
        assert_eq!(
            error.to_string(),
            "test: `{{ steps.maybe.output.x }}`: `steps.maybe.output.x` is undefined: `steps.maybe.output` is null (step `maybe` is skipped)"
        );
        let error = render_with("{{ steps.later.output }}", &scope).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("no step `later` has finished yet"),
            "{error}"
        );
        let error = render_with("{{ [input.nope] }}", &scope).unwrap_err();
        assert!(
            error.to_string().contains("`input.nope` is undefined"),
            "{error}"
        );
        // Inside what a slice is taken of, which MiniJinja does not report.
        let error = render_with("{{ input.user.nick[:3] }}", &scope).unwrap_err();
        assert_eq!(
            error.to_string(),
            "test: `{{ input.user.nick[:3] }}`: `input.user.nick` is undefined; `input.user` has keys: name"
        );
        let error = render_with("{{ item }}", &scope).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("only inside a step with `for_each`"),
            "{error}"
        );
    }

    #[test]
    fn sizes_given_to_filters_are_bounded() {
        let scope = scope();
        assert_eq!(
            render_with(
                "{{ '%05d|%-4s|%.2f|100%%' | format(42, 'ab', 3.14159) }}",
                &scope
            )
            .unwrap(),
            json!("00042|ab  |3.14|100%")
        );
        // Found by `fuzz/fuzz_targets/template.rs`: an exabyte of padding
        // aborted the process (fuzz/regressions/template/).
        let error =
            render_with("{{ '%s-%07766279631452241918d' | format('a', 1) }}", &scope).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("format: a width of 7766279631452241918 is over the limit of 10000"),
            "{error}"
        );
        let error = render_with("{{ '%.999999999f' | format(1.5) }}", &scope).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("format: a precision of 999999999 is over the limit of 10000"),
            "{error}"
        );
        assert!(render_with("{{ '%10000s' | format('x') }}", &scope).is_ok());
        for (template, message) in [
            (
                "{{ [1, 2] | batch(10**18) }}",
                "batch: 1000000000000000000 is over",
            ),
            ("{{ [1, 2] | slice(20000) }}", "slice: 20000 is over"),
            (
                "{{ 'a\nb' | indent(99999999999) }}",
                "indent: 99999999999 is over",
            ),
            (
                "{{ 'a\nb' | indent(width=10**12) }}",
                "indent: 1000000000000 is over",
            ),
            (
                "{{ [1] | tojson(indent=10**15) }}",
                "tojson: 1000000000000000 is over",
            ),
        ] {
            let error = render_with(template, &scope).unwrap_err();
            assert!(error.to_string().contains(message), "{template}: {error}");
        }
        assert_eq!(
            render_with(
                "{{ [1, 2, 3] | batch(2) | list }} {{ [1, 2, 3] | slice(2) | list }} \
                 {{ 'a\nb' | indent(2) }} {{ [1] | tojson(indent=1) }}",
                &scope
            )
            .unwrap(),
            json!("[[1,2],[3]] [[1,2],[3]] a\n  b [\n 1\n]")
        );
        // Found by the fuzzer in the check itself: an unclosed `%(`.
        let error = render_with("{{ '* 1000000%(s-%d' | format('a', 3) }}", &scope).unwrap_err();
        assert!(matches!(error, TemplateError::Failed { .. }), "{error}");
        let error = render_with("{{ '%(n)020000d' | format({'n': 1}) }}", &scope).unwrap_err();
        assert!(
            error.to_string().contains("a width of 20000 is over"),
            "{error}"
        );
    }

    #[test]
    fn other_failures_say_why() {
        let error = render_with("{{ input.n + 'a' }}", &scope()).unwrap_err();
        assert!(matches!(error, TemplateError::Failed { .. }));
        assert!(error.to_string().contains("invalid operation"), "{error}");
        let error = render_with("{{ input.n | nosuchfilter }}", &scope()).unwrap_err();
        assert!(error.to_string().contains("nosuchfilter"), "{error}");
    }

    #[test]
    fn truthiness() {
        let scope = scope();
        let mut builder = TemplatesBuilder::new();
        let cases = [
            ("{{ input.flag }}", false),
            ("{{ input.n > 2 }}", true),
            ("{{ steps.parse.output.total > 100 }}", true),
            ("{{ 0 }}", false),
            ("{{ '' }}", false),
            ("{{ [] }}", false),
            ("{{ {} }}", false),
            ("{{ none }}", false),
            ("{{ 'false' }}", true),
            ("{{ input.items }}", true),
            ("{{ input.flag }} ", false),
            ("x{{ '' }}", true),
            ("{% if input.flag %}yes{% endif %}", false),
            ("{% if input.n %}yes{% endif %}", true),
            (" {{ input.flag }} and", true),
            ("{{ input.n - 3 }}{{ '' }}", false),
            ("False{{ '' }}", false),
            ("false", false),
            (" 0 ", false),
            ("yes", true),
        ];
        let compiled: Vec<(TemplateValue, bool)> = cases
            .iter()
            .map(|(text, expected)| (compile(&mut builder, text), *expected))
            .collect();
        let templates = builder.finish();
        for ((value, expected), (text, _)) in compiled.iter().zip(cases) {
            assert_eq!(
                templates.truthy(value, &scope).unwrap(),
                *expected,
                "{text}"
            );
        }
        assert!(
            !templates
                .truthy(&TemplateValue::Literal(json!(false)), &scope)
                .unwrap()
        );
        assert!(
            templates
                .truthy(&TemplateValue::Literal(json!(true)), &scope)
                .unwrap()
        );
    }

    #[test]
    fn for_each_needs_a_list() {
        let scope = scope();
        let mut builder = TemplatesBuilder::new();
        let list = compile(&mut builder, "{{ input.items }}");
        let text = compile(&mut builder, "{{ input.user }}");
        let templates = builder.finish();
        assert_eq!(
            templates.render_list(&list, &scope).unwrap(),
            vec![json!(1), json!(2), json!(3)]
        );
        let error = templates.render_list(&text, &scope).unwrap_err();
        assert_eq!(
            error.to_string(),
            "test: `{{ input.user }}` must give a list, but gave an object {\"name\":\"Ada\"}"
        );
        let literal = TemplateValue::Literal(json!(["x"]));
        assert_eq!(
            templates.render_list(&literal, &scope).unwrap(),
            vec![json!("x")]
        );
    }

    #[test]
    fn items_extend_the_scope() {
        let scope = scope();
        let mut builder = TemplatesBuilder::new();
        let value = TemplateValue::Object(vec![
            ("value".into(), compile(&mut builder, "{{ item }}")),
            ("at".into(), compile(&mut builder, "{{ index }}")),
            (
                "label".into(),
                compile(
                    &mut builder,
                    "#{{ index }}: {{ item.name }} of {{ input.n }}",
                ),
            ),
            ("fixed".into(), TemplateValue::Literal(json!("x"))),
        ]);
        let templates = builder.finish();
        let item = scope.with_item(&json!({"name": "b"}), 1);
        assert_eq!(
            templates.render(&value, &item).unwrap(),
            json!({"value": {"name": "b"}, "at": 1, "label": "#1: b of 3", "fixed": "x"})
        );
    }

    #[test]
    fn references_are_reported() {
        let mut builder = TemplatesBuilder::new();
        let compiled = builder
            .compile("{{ steps.a.output.x }}{% for i in input.items %}{{ i }}{{ item }}{% endfor %}{{ range(2) }}", "f")
            .unwrap()
            .unwrap();
        assert_eq!(
            compiled.references,
            ["input.items", "item", "range", "steps.a.output.x"]
        );
        assert!(builder.is_global("range"));
        assert!(!builder.is_global("input"));
    }

    /// Paths MiniJinja does not report: the base of a slice, the arguments of
    /// a `{% filter %}` block.
    #[test]
    fn references_minijinja_misses_are_reported() {
        let mut builder = TemplatesBuilder::new();
        let compiled = builder
            .compile(
                "{{ steps.batch.output.digest[:12] }}-{{ (steps.a.output ~ 'x')[1:] }}\
                 {{ x.steps.b }}{% raw %}{{ steps.c.output[:1] }}{% endraw %}\
                 {{ 'steps.d.output'[:2] }}{{ f(steps=1) }}\
                 {% filter replace('a', steps.e.output) %}a{% endfilter %}",
                "f",
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            compiled.references,
            [
                "f",
                "steps.a.output",
                "steps.batch.output.digest",
                "steps.e.output",
                "x.steps.b"
            ]
        );
    }

    #[test]
    fn syntax_errors_have_a_range() {
        let mut builder = TemplatesBuilder::new();
        let error = builder.compile("ok {{ a + }}", "f").err().unwrap();
        assert_eq!(error.message, "unexpected end of variable block");
        assert_eq!(error.range, Some(10..12));
        assert!(builder.compile("plain text", "f").unwrap().is_none());
    }

    #[test]
    fn scopes_are_cheap_to_share() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Scope>();
        fn check_templates<T: Send + Sync>() {}
        check_templates::<Templates>();
    }

    /// Every way the fuzzer or a reading of MiniJinja found to make one
    /// instruction do unbounded work ends in `template_limit`, naming its
    /// bound, with values from the scope (so nothing is known before the run).
    #[test]
    fn templates_are_bounded_in_time_and_memory() {
        let scope = Scope::new(
            "run-1",
            "wf",
            &json!({"big": 81511111729u64, "n": 100000, "s": "ab", "one": 1}),
        );
        for (template, bound) in [
            // The fuzzer's hang: a lazy list of 10^17 empty lists.
            ("{{ 677729 * [] * input.big * 77 * 81 }}", Bound::Value),
            ("{{ ([input.one] * input.big) | list }}", Bound::Value),
            ("{{ input.s * input.big }}", Bound::Value),
            // A string doubled per instruction.
            (
                "{% set ns = namespace(s=input.s) %}{% for i in range(100) %}\
                 {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
                Bound::Value,
            ),
            // A list doubled per instruction, lazily.
            (
                "{% set ns = namespace(l=[input.one]) %}{% for i in range(100) %}\
                 {% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}",
                Bound::Value,
            ),
            // A value of 2^64 leaves built from shared halves.
            (
                "{% set ns = namespace(v=[input.one]) %}{% for i in range(64) %}\
                 {% set ns.v = [ns.v, ns.v] %}{% endfor %}{{ ns.v == ns.v }}",
                Bound::Value,
            ),
            (
                "{{ range(input.n * input.n) | list | length }}",
                Bound::Range,
            ),
            // Nested loops: MiniJinja's fuel.
            (
                "{% for i in range(input.n) %}{% for j in range(input.n) %}\
                 {% endfor %}{% endfor %}",
                Bound::Instructions,
            ),
            // Text printed, by expressions and by the template's own text.
            (
                "{% for i in range(input.n) %}{{ input.s * 1000 }}{% endfor %}",
                Bound::Output,
            ),
            (
                &format!(
                    "{{% for i in range(input.n) %}}{}{{% endfor %}}",
                    "x".repeat(1000)
                ),
                Bound::Output,
            ),
            // Each comparison weighs 80 MB: fine once, not a hundred times.
            (
                "{% set s = input.s * 20000000 %}{% for i in range(100) %}\
                 {% if s == s %}{% endif %}{% endfor %}",
                Bound::Work,
            ),
            // `loop.changed` compares what it is given, every iteration.
            (
                "{% set s = input.s * 20000000 %}{% for i in range(100) %}\
                 {% if loop.changed(s) %}{% endif %}{% endfor %}",
                Bound::Work,
            ),
            // Filters that make more than they are given.
            (
                "{{ range(input.n) | join(input.s * 100000) }}",
                Bound::Value,
            ),
            (
                "{{ (input.s * 10) | replace('a', input.s * 10000000) }}",
                Bound::Value,
            ),
            ("{{ ('a\n' * input.n) | indent(10000) }}", Bound::Value),
            ("{{ [input.one] | batch(10**18) }}", Bound::FilterSize),
        ] {
            let (found, reason) = limit_of(template, &scope);
            assert_eq!(found, bound, "{template}: {reason}");
            assert!(
                reason.starts_with("template_limit: ") && reason.contains(&bound.to_string()),
                "{template}: {reason}"
            );
        }
        // Within the bounds, the same constructs work.
        assert_eq!(
            render_with(
                "{{ [input.one] * 3 }} {{ input.s * 2 }} {{ [1] + [2] }} {{ 'a' ~ 1 }} \
                 {{ [1, [2]] == [1, [2]] }} {{ 2 in [1, 2] }} {{ 'b' in input.s }} \
                 {{ [1, 2, 3][1:] }} {{ {'k': input.one}['k'] }} {{ range(3) | join(',') }} \
                 {% for i in [1, 1, 2] %}{{ loop.changed(i) }}{{ loop.cycle('a', 'b') }}{% endfor %}",
                &scope
            )
            .unwrap(),
            json!("[1, 1, 1] abab [1, 2] a1 true true true [2, 3] 1 0,1,2 trueafalsebtruea")
        );
    }

    #[test]
    fn constant_templates_over_a_bound_are_refused_when_compiled() {
        let mut builder = TemplatesBuilder::new();
        let error = builder
            .compile("x {{ 677729 * [] * 81511111729 * 77 * 81 }}", "f")
            .err()
            .unwrap();
        assert_eq!(error.kind, CompileErrorKind::Limit);
        assert!(
            error.message.contains("the bound on one value"),
            "{}",
            error.message
        );
        // A template that reads the scope is only known at run time.
        assert!(builder.compile("{{ input.n * [] }}", "f").is_ok());
    }

    #[test]
    fn what_cannot_be_bounded_is_refused_with_its_place() {
        let mut builder = TemplatesBuilder::new();
        for (template, message, range) in [
            ("{{ 1 < input.n < 3 }}", "chained comparisons", Some(0..18)),
            ("{% include 't0' %}", "`include`", Some(3..15)),
            ("{{ __trellis_add(1, 2) }}", "reserved", Some(3..16)),
            ("{{ f(*input.items) }}", "unpacking", None),
        ] {
            let error = builder.compile(template, "f").err().unwrap();
            assert_eq!(error.kind, CompileErrorKind::Unsupported, "{template}");
            assert!(
                error.message.contains(message),
                "{template}: {}",
                error.message
            );
            if range.is_some() {
                assert_eq!(error.range, range, "{template}");
            }
        }
    }
}
