//! The text format's parser: the inverse of [`crate::printer`].
//!
//! A hand-written lexer and recursive-descent parser. The grammar:
//!
//! ```text
//! module     := function*
//! function   := "func" @name "{" node* return "}"
//! node       := %v ("," %v)* "=" op [%v ("," %v)*] ["{" [attr ("," attr)*] "}"]
//!               ":" type ("," type)* ["phase" "(" NAME ")"] ["stage" "(" INT ")"]
//! attr       := NAME "=" value
//! value      := INT | FLOAT | "inf" | "-inf" | "nan" | "true" | "false" | STRING | "[" [scalar ("," scalar)*] "]"
//! type       := DTYPE "[" [INT ("," INT)*] "]"
//! return     := "return" [%v "as" STRING ("," %v "as" STRING)*]
//! ```
//!
//! `//` starts a comment that runs to the end of the line. The parser checks syntax, that every
//! operand is defined earlier in its function, that result names and result types agree in number,
//! and that ops and their attributes are known ([`crate::attrs::op_from_parts`]); it does not check
//! types (that is the verifier's job).
//!
//! Errors are [`ParseError`]s located at the offending token; line and column are computed from the
//! byte offset only when an error is made.

use std::collections::HashMap;
use std::fmt;

use crate::attrs::{op_from_parts, Attr};
use crate::function::{Function, Module, Node, Output, Phase, Value};
use crate::op::Op;
use crate::types::{DType, TensorType, MAX_RANK};
use cranelift_entity::SecondaryMap;

/// A syntax error, located at a token of the source text.
///
/// `Display` prints
///
/// ```text
/// 3:8: error: unknown op `matmull`; known ops: ...
///   %2 = matmull %0, %1 : f32[64,256]
///        ^^^^^^^
/// ```
///
/// prefixed with `path:` when a path was attached with [`ParseError::with_path`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// The file the source came from, when known (prefixes the rendered message).
    pub path: Option<String>,
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column (in chars) of the offending token.
    pub column: usize,
    /// Width of the offending token in chars on its line (at least 1): the caret count.
    pub width: usize,
    /// What is wrong.
    pub message: String,
    /// What the parser expected, when a token of a specific kind was expected.
    pub expected: Option<String>,
    /// The text of the offending line, without its line break.
    pub source_line: String,
}

impl ParseError {
    /// Attaches the path of the source file, printed as `path:line:col: error: …`.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Renders the error as `path:line:col: error: …` with the source line and carets.
    pub fn render(&self, path: &str) -> String {
        self.clone().with_path(path).to_string()
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{path}:")?;
        }
        writeln!(f, "{}:{}: error: {}", self.line, self.column, self.message)?;
        writeln!(f, "{}", self.source_line)?;
        // Keep tabs in the indentation so that the carets line up under the token.
        let indent: String = self
            .source_line
            .chars()
            .take(self.column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let pad = self.column.saturating_sub(1) - indent.chars().count();
        write!(
            f,
            "{indent}{}{}",
            " ".repeat(pad),
            "^".repeat(self.width.max(1))
        )
    }
}

/// Parses a module: zero or more functions.
pub fn parse_module(src: &str) -> Result<Module, ParseError> {
    parse_module_with_source_map(src).map(|(m, _)| m)
}

/// Where each node of a parsed module came from: the byte span of its op name, per function (in
/// module order). Later diagnostics (the verifier's) use it to point at the source text.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    /// Per function, the op-name span of each node.
    pub functions: Vec<SecondaryMap<Node, Option<(usize, usize)>>>,
    /// Per function, the span of its `@name`.
    pub names: Vec<(usize, usize)>,
}

impl SourceMap {
    /// The op-name span of a node of function `func_index`.
    pub fn span(&self, func_index: usize, node: Node) -> Option<(usize, usize)> {
        self.functions.get(func_index).and_then(|m| m[node])
    }
}

/// Makes an error located at a byte span of `src` (for diagnostics found after parsing).
pub fn located_error(src: &str, span: (usize, usize), message: String) -> ParseError {
    Parser::new(src).error(span.0, span.1, message)
}

/// Parses a module and records where every node came from.
pub fn parse_module_with_source_map(src: &str) -> Result<(Module, SourceMap), ParseError> {
    let mut p = Parser::new(src);
    let mut module = Module::new();
    let mut map = SourceMap::default();
    let mut names: HashMap<String, usize> = HashMap::new();
    loop {
        let tok = p.peek()?;
        match tok.kind {
            Kind::Eof => break,
            Kind::Ident if p.text(tok) == "func" => {
                let (func, name_tok) = p.function()?;
                if let Some(&first) = names.get(&func.name) {
                    return Err(p.error(
                        name_tok.start,
                        name_tok.end,
                        format!(
                            "duplicate function @{} (first defined at line {})",
                            func.name,
                            p.line_of(first)
                        ),
                    ));
                }
                names.insert(func.name.clone(), name_tok.start);
                let mut spans = SecondaryMap::with_default(None);
                for (&node, &span) in func.body.iter().zip(&p.node_spans) {
                    spans[node] = Some(span);
                }
                p.node_spans.clear();
                map.functions.push(spans);
                map.names.push((name_tok.start, name_tok.end));
                module.functions.push(func);
            }
            _ => return Err(p.expected(tok, "`func` to start a function")),
        }
    }
    Ok((module, map))
}

/// Parses a single function (the whole input must be exactly one `func`).
pub fn parse_function(src: &str) -> Result<Function, ParseError> {
    let mut p = Parser::new(src);
    let tok = p.peek()?;
    if !(tok.kind == Kind::Ident && p.text(tok) == "func") {
        return Err(p.expected(tok, "`func` to start a function"));
    }
    let (func, _) = p.function()?;
    let tok = p.peek()?;
    if tok.kind != Kind::Eof {
        return Err(p.expected(tok, &format!("end of input after function @{}", func.name)));
    }
    Ok(func)
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `[A-Za-z_][A-Za-z0-9_]*`: keywords, op names, dtypes, attribute names.
    Ident,
    /// `@name`.
    FuncName,
    /// `%name`.
    ValueName,
    Int,
    Float,
    /// A string literal (validated; decoded on use).
    Str,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    LParen,
    RParen,
    Comma,
    Equals,
    Colon,
    Eof,
}

/// A token: its kind and byte span in the source.
#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_value_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

fn is_func_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$' | b'-')
}

/// Result of scanning a string literal: the end of the literal, or an error span and message.
type ScanResult = Result<usize, (usize, usize, String)>;

/// Scans the string literal starting at the `"` at `start`, appending the decoded text to `out`
/// when given. Returns the byte offset just past the closing quote.
fn scan_string(src: &str, start: usize, mut out: Option<&mut String>) -> ScanResult {
    let bytes = src.as_bytes();
    let mut i = start + 1;
    loop {
        let Some(c) = src.get(i..).and_then(|s| s.chars().next()) else {
            return Err((start, start + 1, "unterminated string literal".into()));
        };
        match c {
            '"' => return Ok(i + 1),
            '\n' | '\r' => {
                return Err((
                    start,
                    start + 1,
                    "unterminated string literal (line breaks in strings are written `\\n`)".into(),
                ))
            }
            '\\' => {
                let esc_start = i;
                let Some(&e) = bytes.get(i + 1) else {
                    return Err((start, start + 1, "unterminated string literal".into()));
                };
                let decoded = match e {
                    b'"' => {
                        i += 2;
                        '"'
                    }
                    b'\\' => {
                        i += 2;
                        '\\'
                    }
                    b'n' => {
                        i += 2;
                        '\n'
                    }
                    b't' => {
                        i += 2;
                        '\t'
                    }
                    b'u' => {
                        if bytes.get(i + 2) != Some(&b'{') {
                            return Err((
                                esc_start,
                                esc_start + 2,
                                "expected `{` after `\\u` (write `\\u{hex}`)".into(),
                            ));
                        }
                        let digits_start = i + 3;
                        let mut j = digits_start;
                        while j < bytes.len() && bytes[j].is_ascii_hexdigit() {
                            j += 1;
                        }
                        if bytes.get(j) != Some(&b'}') {
                            return Err((
                                esc_start,
                                j.min(bytes.len()).max(esc_start + 2),
                                "unterminated `\\u{...}` escape (expected hex digits and `}`)"
                                    .into(),
                            ));
                        }
                        let hex = &src[digits_start..j];
                        let ch = if hex.is_empty() || hex.len() > 6 {
                            None
                        } else {
                            u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
                        };
                        let Some(ch) = ch else {
                            return Err((
                                esc_start,
                                j + 1,
                                format!("`\\u{{{hex}}}` is not a valid Unicode scalar value"),
                            ));
                        };
                        i = j + 1;
                        ch
                    }
                    _ => {
                        let len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                        return Err((
                            esc_start,
                            i + 1 + len,
                            format!(
                                "unknown escape `{}` (known: `\\\"`, `\\\\`, `\\n`, `\\t`, `\\u{{hex}}`)",
                                &src[esc_start..i + 1 + len]
                            ),
                        ));
                    }
                };
                if let Some(out) = out.as_deref_mut() {
                    out.push(decoded);
                }
            }
            c => {
                if let Some(out) = out.as_deref_mut() {
                    out.push(c);
                }
                i += c.len_utf8();
            }
        }
    }
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
}

impl<'s> Lexer<'s> {
    fn skip_trivia(&mut self) {
        let bytes = self.src.as_bytes();
        loop {
            while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if bytes.get(self.pos) == Some(&b'/') && bytes.get(self.pos + 1) == Some(&b'/') {
                while self.pos < bytes.len() && bytes[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else {
                return;
            }
        }
    }

    /// Lexes the next token; on error returns the span and message.
    fn next(&mut self) -> Result<Token, (usize, usize, String)> {
        self.skip_trivia();
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let tok = |kind, end| Token { kind, start, end };
        let Some(&b) = bytes.get(start) else {
            return Ok(tok(Kind::Eof, start));
        };
        let punct = match b {
            b'{' => Some(Kind::LBrace),
            b'}' => Some(Kind::RBrace),
            b'[' => Some(Kind::LBracket),
            b']' => Some(Kind::RBracket),
            b'(' => Some(Kind::LParen),
            b')' => Some(Kind::RParen),
            b',' => Some(Kind::Comma),
            b'=' => Some(Kind::Equals),
            b':' => Some(Kind::Colon),
            _ => None,
        };
        if let Some(kind) = punct {
            self.pos += 1;
            return Ok(tok(kind, start + 1));
        }
        let run = |from: usize, pred: fn(u8) -> bool| {
            let mut i = from;
            while i < bytes.len() && pred(bytes[i]) {
                i += 1;
            }
            i
        };
        let (kind, end) = match b {
            b'%' | b'@' => {
                let (kind, pred, what): (_, fn(u8) -> bool, _) = if b == b'%' {
                    (Kind::ValueName, is_value_char, "a value name after `%`")
                } else {
                    (Kind::FuncName, is_func_char, "a function name after `@`")
                };
                let end = run(start + 1, pred);
                if end == start + 1 {
                    return Err((start, start + 1, format!("expected {what}")));
                }
                (kind, end)
            }
            b'"' => {
                let end = scan_string(self.src, start, None)?;
                (Kind::Str, end)
            }
            b'-' | b'0'..=b'9' => self.number(start)?,
            b if is_ident_start(b) => (Kind::Ident, run(start, is_ident_char)),
            _ => {
                let c = self.src[start..].chars().next().unwrap_or('?');
                let shown = if c.is_control() || c.is_whitespace() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                };
                return Err((
                    start,
                    start + c.len_utf8(),
                    format!("unexpected character `{shown}`"),
                ));
            }
        };
        self.pos = end;
        Ok(tok(kind, end))
    }

    /// Lexes `-?digits(.digits)?([eE][+-]?digits)?` or `-inf`.
    fn number(&self, start: usize) -> Result<(Kind, usize), (usize, usize, String)> {
        let bytes = self.src.as_bytes();
        let digits = |mut i: usize| {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            i
        };
        // The whole run of number-like characters, for error spans.
        let junk_end = |mut i: usize| {
            while i < bytes.len() && (is_ident_char(bytes[i]) || bytes[i] == b'.') {
                i += 1;
            }
            i
        };
        let mut i = start;
        if bytes[i] == b'-' {
            i += 1;
            let rest = &bytes[i..];
            if rest.starts_with(b"inf") && !rest.get(3).is_some_and(|&c| is_ident_char(c)) {
                return Ok((Kind::Float, i + 3));
            }
            if !rest.first().is_some_and(u8::is_ascii_digit) {
                return Err((
                    start,
                    start + 1,
                    "expected a number or `inf` after `-`".into(),
                ));
            }
        }
        i = digits(i);
        let mut kind = Kind::Int;
        if bytes.get(i) == Some(&b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1);
            kind = Kind::Float;
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(bytes.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            if bytes.get(j).is_some_and(u8::is_ascii_digit) {
                i = digits(j);
                kind = Kind::Float;
            }
        }
        if bytes.get(i).is_some_and(|&c| is_ident_char(c) || c == b'.') {
            let end = junk_end(i);
            return Err((
                start,
                end,
                format!("invalid number literal `{}`", &self.src[start..end]),
            ));
        }
        Ok((kind, i))
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// The longest token text quoted in an error message.
const MAX_QUOTED: usize = 40;

struct Parser<'s> {
    src: &'s str,
    lexer: Lexer<'s>,
    peeked: Option<Token>,
    /// End of the last consumed token: where "unexpected end of input" errors point.
    last_end: usize,
    known_ops: Vec<&'static str>,
    /// Op-name spans of the nodes of the function being parsed, in body order.
    node_spans: Vec<(usize, usize)>,
}

/// One function's value names.
struct Scope<'s> {
    /// Name (without `%`) to value and the byte offset of its definition.
    values: HashMap<&'s str, (Value, usize)>,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Self {
        Parser {
            src,
            lexer: Lexer { src, pos: 0 },
            peeked: None,
            last_end: 0,
            known_ops: Op::all_names(),
            node_spans: Vec::new(),
        }
    }

    // --- errors --------------------------------------------------------------------------------

    fn line_of(&self, pos: usize) -> usize {
        let pos = pos.min(self.src.len());
        self.src.as_bytes()[..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Makes an error located at the byte span `start..end`.
    fn error(&self, start: usize, end: usize, message: String) -> ParseError {
        let src = self.src;
        // Spans are always on char boundaries; stay safe (never panic) if one is not.
        let floor = |mut i: usize| {
            i = i.min(src.len());
            while !src.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let start = floor(start);
        let end = floor(end.max(start));
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
        let source_line = src[line_start..line_end].trim_end_matches('\r');
        ParseError {
            path: None,
            line: self.line_of(start),
            column: src[line_start..start].chars().count() + 1,
            width: src[start..end.min(line_end)].chars().count().max(1),
            message,
            expected: None,
            source_line: source_line.to_string(),
        }
    }

    fn error_at(&self, tok: Token, message: String) -> ParseError {
        self.error(tok.start, tok.end, message)
    }

    fn describe(&self, tok: Token) -> String {
        if tok.kind == Kind::Eof {
            return "end of input".into();
        }
        let text = self.text(tok);
        if text.chars().count() > MAX_QUOTED {
            let short: String = text.chars().take(MAX_QUOTED).collect();
            format!("`{short}…`")
        } else {
            format!("`{text}`")
        }
    }

    /// "expected X, found Y" at `tok` (or "unexpected end of input: expected X" at the end).
    fn expected(&self, tok: Token, what: &str) -> ParseError {
        let found = self.describe(tok);
        let mut err = if tok.kind == Kind::Eof {
            self.error(
                self.last_end,
                self.last_end,
                format!("unexpected end of input: expected {what}"),
            )
        } else {
            self.error_at(tok, format!("expected {what}, found {found}"))
        };
        err.expected = Some(what.to_string());
        err
    }

    // --- tokens --------------------------------------------------------------------------------

    fn text(&self, tok: Token) -> &'s str {
        &self.src[tok.start..tok.end]
    }

    fn peek(&mut self) -> Result<Token, ParseError> {
        if let Some(tok) = self.peeked {
            return Ok(tok);
        }
        match self.lexer.next() {
            Ok(tok) => {
                self.peeked = Some(tok);
                Ok(tok)
            }
            Err((start, end, message)) => Err(self.error(start, end, message)),
        }
    }

    fn bump(&mut self) -> Result<Token, ParseError> {
        let tok = self.peek()?;
        self.peeked = None;
        if tok.kind != Kind::Eof {
            self.last_end = tok.end;
        }
        Ok(tok)
    }

    /// Consumes a token of the given kind, or fails with "expected `what`".
    fn expect(&mut self, kind: Kind, what: &str) -> Result<Token, ParseError> {
        let tok = self.peek()?;
        if tok.kind == kind {
            self.bump()
        } else {
            Err(self.expected(tok, what))
        }
    }

    /// Consumes the token if it has the given kind.
    fn eat(&mut self, kind: Kind) -> Result<bool, ParseError> {
        if self.peek()?.kind == kind {
            self.bump()?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn is_keyword(&self, tok: Token, word: &str) -> bool {
        tok.kind == Kind::Ident && self.text(tok) == word
    }

    fn string_value(&self, tok: Token) -> Result<String, ParseError> {
        let mut out = String::with_capacity(tok.end - tok.start);
        scan_string(self.src, tok.start, Some(&mut out))
            .map_err(|(s, e, m)| self.error(s, e, m))?;
        Ok(out)
    }

    fn int_value(&self, tok: Token) -> Result<i64, ParseError> {
        self.text(tok).parse::<i64>().map_err(|_| {
            self.error_at(
                tok,
                format!(
                    "integer literal {} does not fit in 64 bits",
                    self.describe(tok)
                ),
            )
        })
    }

    fn float_value(&self, tok: Token) -> Result<f64, ParseError> {
        let text = self.text(tok);
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() || text.ends_with("inf") => Ok(x),
            _ => Err(self.error_at(
                tok,
                format!(
                    "float literal {} is out of range for f64",
                    self.describe(tok)
                ),
            )),
        }
    }

    // --- functions -----------------------------------------------------------------------------

    /// Parses `func @name { … }`; returns the function and its name token.
    fn function(&mut self) -> Result<(Function, Token), ParseError> {
        self.bump()?; // `func`
        let name_tok = self.expect(Kind::FuncName, "a function name (`@name`) after `func`")?;
        let name = &self.text(name_tok)[1..];
        self.expect(Kind::LBrace, &format!("`{{` after `func @{name}`"))?;
        let mut func = Function::new(name);
        let mut scope = Scope {
            values: HashMap::new(),
        };
        loop {
            let tok = self.peek()?;
            match tok.kind {
                Kind::ValueName => self.node(&mut func, &mut scope)?,
                Kind::Ident if self.text(tok) == "return" => {
                    self.bump()?;
                    self.return_(&mut func, &scope)?;
                    break;
                }
                Kind::RBrace => {
                    return Err(self.error_at(
                        tok,
                        format!(
                            "function @{name} has no `return` (every function ends with `return`)"
                        ),
                    ))
                }
                Kind::Eof => {
                    return Err(
                        self.expected(tok, &format!("a node or `return` in function @{name}"))
                    )
                }
                _ => return Err(self.expected(tok, "a node (`%name = op …`) or `return`")),
            }
        }
        Ok((func, name_tok))
    }

    /// Parses the outputs after `return` and the closing `}`.
    fn return_(&mut self, func: &mut Function, scope: &Scope<'s>) -> Result<(), ParseError> {
        let close = format!("`}}` to close function @{}", func.name);
        if self.peek()?.kind == Kind::ValueName {
            loop {
                let v = self.expect(Kind::ValueName, "an output value (`%name`) after `,`")?;
                let value = self.lookup(scope, v, None)?;
                let as_tok = self.peek()?;
                if !self.is_keyword(as_tok, "as") {
                    return Err(self.expected(
                        as_tok,
                        &format!("`as` and an output name after {}", self.text(v)),
                    ));
                }
                self.bump()?;
                let s = self.expect(Kind::Str, "an output name (a string) after `as`")?;
                let name = self.string_value(s)?;
                func.outputs.push(Output { name, value });
                let tok = self.peek()?;
                match tok.kind {
                    Kind::Comma => {
                        self.bump()?;
                    }
                    Kind::RBrace => break,
                    Kind::Eof => return Err(self.expected(tok, &close)),
                    _ => return Err(self.expected(tok, &format!("`,` or {close}"))),
                }
            }
        }
        self.expect(Kind::RBrace, &close)?;
        Ok(())
    }

    /// Resolves an operand or output name. `current` holds the result names of the node being
    /// parsed, which may not use its own results.
    fn lookup(
        &self,
        scope: &Scope<'s>,
        tok: Token,
        current: Option<&[Token]>,
    ) -> Result<Value, ParseError> {
        let name = &self.text(tok)[1..];
        if let Some(&(v, _)) = scope.values.get(name) {
            return Ok(v);
        }
        if current.is_some_and(|rs| rs.iter().any(|&r| self.text(r) == self.text(tok))) {
            return Err(self.error_at(
                tok,
                format!(
                    "value {} is used by the node that defines it",
                    self.text(tok)
                ),
            ));
        }
        match self.find_later_definition(tok) {
            Some(def) => Err(self.error_at(
                tok,
                format!(
                    "value {} is used before its definition at line {}",
                    self.text(tok),
                    self.line_of(def)
                ),
            )),
            None => Err(self.error_at(tok, format!("use of undefined value {}", self.text(tok)))),
        }
    }

    /// Scans the rest of the current function (from after `use_tok`) for a definition of the same
    /// value name: the name in a result list `%a, %b, … =`. Only runs when making an error.
    fn find_later_definition(&self, use_tok: Token) -> Option<usize> {
        let target = self.text(use_tok);
        let mut lexer = Lexer {
            src: self.src,
            pos: use_tok.end,
        };
        let mut depth = 0usize;
        #[derive(PartialEq)]
        enum State {
            Other,
            AfterName,
            AfterComma,
        }
        let mut state = State::Other;
        // Start of the target name when it was seen in what may be a result list.
        let mut candidate: Option<usize> = None;
        loop {
            let tok = lexer.next().ok()?;
            match tok.kind {
                Kind::Eof => return None,
                Kind::LBrace => depth += 1,
                Kind::RBrace => {
                    if depth == 0 {
                        return None; // the end of the function
                    }
                    depth -= 1;
                }
                Kind::Ident if depth == 0 && self.text(tok) == "func" => return None,
                _ => {}
            }
            match tok.kind {
                Kind::ValueName => {
                    if state != State::AfterComma {
                        candidate = None; // a new list starts here
                    }
                    if self.text(tok) == target {
                        candidate = Some(tok.start);
                    }
                    state = State::AfterName;
                }
                Kind::Comma if state == State::AfterName => state = State::AfterComma,
                Kind::Equals if state == State::AfterName && candidate.is_some() => {
                    return candidate
                }
                _ => {
                    state = State::Other;
                    candidate = None;
                }
            }
        }
    }

    // --- nodes ---------------------------------------------------------------------------------

    fn node(&mut self, func: &mut Function, scope: &mut Scope<'s>) -> Result<(), ParseError> {
        // Result names.
        let mut results: Vec<Token> = Vec::with_capacity(1);
        loop {
            let tok = self.expect(Kind::ValueName, "a result name (`%name`) after `,`")?;
            let name = &self.text(tok)[1..];
            if let Some(&(_, def)) = scope.values.get(name) {
                return Err(self.error_at(
                    tok,
                    format!(
                        "redefinition of value %{name} (first defined at line {})",
                        self.line_of(def)
                    ),
                ));
            }
            if results.iter().any(|&r| self.text(r) == self.text(tok)) {
                return Err(self.error_at(
                    tok,
                    format!("value %{name} is defined twice by the same node"),
                ));
            }
            results.push(tok);
            if !self.eat(Kind::Comma)? {
                break;
            }
        }
        let tok = self.peek()?;
        if tok.kind != Kind::Equals {
            return Err(self.expected(tok, "`=` after the result names"));
        }
        self.bump()?;

        // Op name.
        let op_tok = self.expect(Kind::Ident, "an op name after `=`")?;
        let op_name = self.text(op_tok);
        if self.known_ops.binary_search(&op_name).is_err() {
            return Err(self.error_at(
                op_tok,
                format!(
                    "unknown op `{op_name}`; known ops: {}",
                    self.known_ops.join(", ")
                ),
            ));
        }

        // Operands.
        let mut operands = Vec::new();
        if self.peek()?.kind == Kind::ValueName {
            loop {
                let tok = self.expect(Kind::ValueName, "an operand (`%name`) after `,`")?;
                operands.push(self.lookup(scope, tok, Some(&results))?);
                if !self.eat(Kind::Comma)? {
                    break;
                }
            }
        }

        // Attributes.
        let mut attrs = Vec::new();
        if self.peek()?.kind == Kind::LBrace {
            attrs = self.attrs()?;
        }

        // Result types.
        let tok = self.peek()?;
        if tok.kind != Kind::Colon {
            return Err(self.expected(tok, "`:` before the result types"));
        }
        self.bump()?;
        let mut types = Vec::with_capacity(results.len());
        loop {
            types.push(self.tensor_type()?);
            if !self.eat(Kind::Comma)? {
                break;
            }
        }

        // Annotations.
        let mut phase: Option<Phase> = None;
        let mut stage: Option<u32> = None;
        loop {
            let tok = self.peek()?;
            if self.is_keyword(tok, "phase") {
                if phase.is_some() {
                    return Err(self.error_at(tok, "duplicate `phase` annotation".into()));
                }
                self.bump()?;
                self.expect(Kind::LParen, "`(` after `phase`")?;
                let p = self.expect(Kind::Ident, "a phase name")?;
                let Some(ph) = Phase::from_name(self.text(p)) else {
                    let known: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
                    return Err(self.error_at(
                        p,
                        format!(
                            "unknown phase `{}`; known phases: {}",
                            self.text(p),
                            known.join(", ")
                        ),
                    ));
                };
                self.expect(Kind::RParen, "`)` after the phase name")?;
                phase = Some(ph);
            } else if self.is_keyword(tok, "stage") {
                if stage.is_some() {
                    return Err(self.error_at(tok, "duplicate `stage` annotation".into()));
                }
                self.bump()?;
                self.expect(Kind::LParen, "`(` after `stage`")?;
                let n = self.expect(Kind::Int, "a stage number")?;
                let Ok(s) = self.text(n).parse::<u32>() else {
                    return Err(self.error_at(
                        n,
                        format!("stage {} is not an integer in 0..2^32", self.describe(n)),
                    ));
                };
                self.expect(Kind::RParen, "`)` after the stage number")?;
                stage = Some(s);
            } else {
                break;
            }
        }

        if results.len() != types.len() {
            let first = results[0];
            let last = results[results.len() - 1];
            return Err(self.error(
                first.start,
                last.end,
                format!(
                    "{} result name{} but {} result type{} declared",
                    results.len(),
                    if results.len() == 1 { "" } else { "s" },
                    types.len(),
                    if types.len() == 1 { " is" } else { "s are" },
                ),
            ));
        }

        let op = op_from_parts(op_name, attrs, &types).map_err(|msg| self.error_at(op_tok, msg))?;
        let node = func.push_node(op, operands, types);
        self.node_spans.push((op_tok.start, op_tok.end));
        let data = &mut func.nodes[node];
        data.phase = phase.unwrap_or_default();
        data.stage = stage;
        for (&tok, &v) in results.iter().zip(&data.results) {
            scope.values.insert(&self.text(tok)[1..], (v, tok.start));
        }
        Ok(())
    }

    /// Parses `{key = value, …}`.
    fn attrs(&mut self) -> Result<Vec<(String, Attr)>, ParseError> {
        self.bump()?; // `{`
        let mut attrs: Vec<(String, Attr)> = Vec::new();
        if self.eat(Kind::RBrace)? {
            return Ok(attrs);
        }
        loop {
            let key = self.expect(Kind::Ident, "an attribute name")?;
            let name = self.text(key);
            if attrs.iter().any(|(k, _)| k == name) {
                return Err(self.error_at(key, format!("duplicate attribute `{name}`")));
            }
            self.expect(Kind::Equals, &format!("`=` after attribute name `{name}`"))?;
            let value = self.attr_value()?;
            attrs.push((name.to_string(), value));
            let tok = self.peek()?;
            match tok.kind {
                Kind::Comma => {
                    self.bump()?;
                }
                Kind::RBrace => {
                    self.bump()?;
                    return Ok(attrs);
                }
                _ => return Err(self.expected(tok, "`,` or `}` in the attribute list")),
            }
        }
    }

    fn attr_value(&mut self) -> Result<Attr, ParseError> {
        let tok = self.peek()?;
        if tok.kind == Kind::LBracket {
            self.bump()?;
            return self.attr_list();
        }
        match self.scalar(tok, "an attribute value")? {
            Scalar::Int(i) => Ok(Attr::Int(i)),
            Scalar::Float(x) => Ok(Attr::Float(x)),
            Scalar::Bool(b) => Ok(Attr::Bool(b)),
            Scalar::Str(s) => Ok(Attr::Str(s)),
        }
    }

    /// Parses a scalar attribute value at `tok` and consumes it.
    fn scalar(&mut self, tok: Token, what: &str) -> Result<Scalar, ParseError> {
        let value = match tok.kind {
            Kind::Int => Scalar::Int(self.int_value(tok)?),
            Kind::Float => Scalar::Float(self.float_value(tok)?),
            Kind::Str => Scalar::Str(self.string_value(tok)?),
            Kind::Ident => match self.text(tok) {
                "true" => Scalar::Bool(true),
                "false" => Scalar::Bool(false),
                "inf" => Scalar::Float(f64::INFINITY),
                "nan" => Scalar::Float(f64::NAN),
                _ => return Err(self.expected(tok, what)),
            },
            _ => return Err(self.expected(tok, what)),
        };
        self.bump()?;
        Ok(value)
    }

    /// Parses the elements of a list after `[`, and the `]`.
    fn attr_list(&mut self) -> Result<Attr, ParseError> {
        let mut ints: Vec<i64> = Vec::new();
        let mut floats: Vec<f64> = Vec::new();
        let mut bools: Vec<bool> = Vec::new();
        // Whether any float was seen (then every number goes to `floats`).
        let mut any_float = false;
        let mut first_bool = None;
        let mut first_number = None;
        if !self.eat(Kind::RBracket)? {
            loop {
                let tok = self.peek()?;
                if tok.kind == Kind::LBracket {
                    return Err(self.error_at(tok, "nested lists are not supported".into()));
                }
                let what = "a list element (a number or `true`/`false`)";
                match self.scalar(tok, what)? {
                    Scalar::Int(i) => {
                        first_number.get_or_insert(tok);
                        ints.push(i);
                        floats.push(i as f64);
                    }
                    Scalar::Float(x) => {
                        first_number.get_or_insert(tok);
                        any_float = true;
                        floats.push(x);
                    }
                    Scalar::Bool(b) => {
                        first_bool.get_or_insert(tok);
                        bools.push(b);
                    }
                    Scalar::Str(_) => {
                        return Err(self.error_at(tok, "lists of strings are not supported".into()))
                    }
                }
                if let (Some(b), Some(n)) = (first_bool, first_number) {
                    let later = if b.start > n.start { b } else { n };
                    return Err(
                        self.error_at(later, "a list cannot mix booleans and numbers".into())
                    );
                }
                let tok = self.peek()?;
                match tok.kind {
                    Kind::Comma => {
                        self.bump()?;
                    }
                    Kind::RBracket => {
                        self.bump()?;
                        break;
                    }
                    _ => return Err(self.expected(tok, "`,` or `]` in the list")),
                }
            }
        }
        Ok(if first_bool.is_some() {
            Attr::Bools(bools)
        } else if any_float {
            Attr::Floats(floats)
        } else {
            Attr::Ints(ints)
        })
    }

    /// Parses `dtype[d0,d1,…]`.
    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        const DTYPES: &str = "a dtype (f32, f64, f16, bf16, i32, i64, bool)";
        let tok = self.peek()?;
        let dtype = match tok.kind {
            Kind::Ident => DType::from_name(self.text(tok)),
            _ => None,
        };
        let Some(dtype) = dtype else {
            return Err(self.expected(tok, DTYPES));
        };
        self.bump()?;
        self.expect(
            Kind::LBracket,
            &format!("`[` and the dimensions after `{dtype}`"),
        )?;
        let mut shape = Vec::new();
        if !self.eat(Kind::RBracket)? {
            loop {
                let d = self.peek()?;
                let extent = match d.kind {
                    Kind::Int => self.text(d).parse::<usize>().ok(),
                    _ => None,
                };
                let Some(extent) = extent else {
                    return Err(self.expected(d, "a dimension extent (a non-negative integer)"));
                };
                self.bump()?;
                shape.push(extent);
                let sep = self.peek()?;
                match sep.kind {
                    Kind::Comma => {
                        self.bump()?;
                    }
                    Kind::RBracket => {
                        self.bump()?;
                        break;
                    }
                    _ => return Err(self.expected(sep, "`,` or `]` in the shape")),
                }
            }
        }
        if shape.len() > MAX_RANK {
            return Err(self.error(
                tok.start,
                self.last_end,
                format!("rank {} exceeds the maximum rank {MAX_RANK}", shape.len()),
            ));
        }
        Ok(TensorType::new(dtype, shape))
    }
}

/// A scalar attribute value or list element.
enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Literal, PoolKind};

    fn parse_one(src: &str) -> Function {
        parse_function(src).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(src: &str) -> ParseError {
        match parse_module(src) {
            Ok(m) => panic!("expected an error, parsed:\n{m}"),
            Err(e) => e,
        }
    }

    /// The op of the last node of a one-function source.
    fn last_op(src: &str) -> Op {
        let f = parse_one(src);
        f.nodes[*f.body.last().unwrap()].op.clone()
    }

    fn constant(value: &str, ty: &str) -> Literal {
        let src = format!("func @f {{\n  %0 = constant {{value = {value}}} : {ty}\n  return\n}}\n");
        match last_op(&src) {
            Op::Constant { value, .. } => value,
            op => panic!("{op:?}"),
        }
    }

    const MLP: &str = r#"func @mlp {
  %0 = input {name = "x"} : f32[64,784]
  %1 = param {name = "fc1.weight"} : f32[784,256]
  %2 = matmul %0, %1 {transpose_rhs = true} : f32[64,256]
  %3, %4 = split %2 {axis = 1, sizes = [128, 128]} : f32[64,128], f32[64,128]
  %5 = add %3, %4 : f32[64,128] phase(dgrad) stage(1)
  %6 = constant {value = [1.0, -2.5e-3, inf, nan]} : f32[4]
  return %5 as "out", %6 as "c"
}
"#;

    #[test]
    fn parses_the_example() {
        let f = parse_one(MLP);
        assert_eq!(f.name, "mlp");
        assert_eq!(f.body.len(), 6);
        assert_eq!(f.args().count(), 2);
        let split = &f.nodes[f.body[3]];
        assert_eq!(split.results.len(), 2);
        assert_eq!(
            split.op,
            Op::Split {
                axis: 1,
                sizes: vec![128, 128]
            }
        );
        let add = &f.nodes[f.body[4]];
        assert_eq!(add.operands, split.results);
        assert_eq!(add.phase, Phase::Dgrad);
        assert_eq!(add.stage, Some(1));
        assert_eq!(f.outputs.len(), 2);
        assert_eq!(f.outputs[0].name, "out");
        assert_eq!(f.outputs[0].value, add.results[0]);
        assert_eq!(
            f.nodes[f.body[2]].op,
            Op::MatMul {
                transpose_lhs: false,
                transpose_rhs: true
            }
        );
        // Printing gives the canonical text back (the float `-2.5e-3` prints as `-0.0025`).
        let expected = MLP.replace("-2.5e-3", "-0.0025");
        assert_eq!(f.to_string(), expected);
    }

    #[test]
    fn empty_module_and_comments() {
        assert!(parse_module("").unwrap().functions.is_empty());
        assert!(parse_module("  \n\t\r\n").unwrap().functions.is_empty());
        assert!(parse_module("// only a comment")
            .unwrap()
            .functions
            .is_empty());
        let src = "// header\nfunc @a { // open\n  // a node:\n  %x = input {name = \"x\"} : f32[] // c\n  return %x as \"y\" // done\n}\n// -----\nfunc @b {\n  return\n}\n// -----";
        let m = parse_module(src).unwrap();
        assert_eq!(m.functions.len(), 2);
        assert_eq!(m.functions[1].name, "b");
        assert!(m.functions[1].outputs.is_empty());
        assert!(m.functions[1].body.is_empty());
    }

    #[test]
    fn whitespace_is_insignificant() {
        let f = parse_one(
            "func @f{%0=input{name=\"x\"}:f32[2,3]%1=relu %0:f32[2,3]stage(2)phase(wgrad)return %1 as\"y\"}",
        );
        assert_eq!(f.body.len(), 2);
        let relu = &f.nodes[f.body[1]];
        assert_eq!(relu.phase, Phase::Wgrad);
        assert_eq!(relu.stage, Some(2));
    }

    #[test]
    fn return_with_no_outputs() {
        let f = parse_one("func @f {\n  return\n}\n");
        assert!(f.outputs.is_empty());
        assert_eq!(f.to_string(), "func @f {\n  return\n}\n");
    }

    #[test]
    fn value_and_function_names() {
        let f = parse_one(
            "func @a.b$c-d_9 {\n  %in.put_1 = input {name = \"x\"} : f32[]\n  %12 = neg %in.put_1 : f32[]\n  return %12 as \"o\"\n}",
        );
        assert_eq!(f.name, "a.b$c-d_9");
        assert_eq!(f.body.len(), 2);
        // Printing renumbers.
        assert!(f.to_string().contains("%1 = neg %0 : f32[]"));
    }

    #[test]
    fn attribute_kinds() {
        assert_eq!(constant("3", "i32[]"), Literal::Int(vec![3]));
        assert_eq!(constant("-3", "i64[]"), Literal::Int(vec![-3]));
        assert_eq!(
            constant("-9223372036854775808", "i64[]"),
            Literal::Int(vec![i64::MIN])
        );
        assert_eq!(constant("3", "f32[]"), Literal::Float(vec![3.0]));
        assert_eq!(constant("1.5", "f32[]"), Literal::Float(vec![1.5]));
        assert_eq!(constant("-2.5e-3", "f32[]"), Literal::Float(vec![-2.5e-3]));
        assert_eq!(constant("1e20", "f64[]"), Literal::Float(vec![1e20]));
        assert_eq!(constant("1E+2", "f64[]"), Literal::Float(vec![100.0]));
        assert_eq!(
            constant("inf", "f64[]"),
            Literal::Float(vec![f64::INFINITY])
        );
        assert_eq!(
            constant("-inf", "f64[]"),
            Literal::Float(vec![f64::NEG_INFINITY])
        );
        match constant("nan", "f64[]") {
            Literal::Float(v) => assert!(v.len() == 1 && v[0].is_nan()),
            other => panic!("{other:?}"),
        }
        match constant("-0.0", "f64[]") {
            Literal::Float(v) => assert!(v[0] == 0.0 && v[0].is_sign_negative()),
            other => panic!("{other:?}"),
        }
        assert_eq!(constant("true", "bool[]"), Literal::Bool(vec![true]));
        assert_eq!(
            constant("[true, false]", "bool[2]"),
            Literal::Bool(vec![true, false])
        );
        assert_eq!(constant("[1, -2]", "i32[2]"), Literal::Int(vec![1, -2]));
        // Mixed ints and floats make a float list.
        assert_eq!(
            constant("[1, 2.5, -inf]", "f32[3]"),
            Literal::Float(vec![1.0, 2.5, f64::NEG_INFINITY])
        );
        // An empty list is an empty int list.
        assert_eq!(constant("[]", "i32[0]"), Literal::Int(vec![]));
        assert_eq!(constant("[ ]", "f32[0]"), Literal::Float(vec![]));
        assert_eq!(constant("[]", "bool[0,2]"), Literal::Bool(vec![]));

        // Strings, via `input`; lists of uints, bools and floats via real ops.
        let f = parse_one(
            "func @f {\n  %0 = param {name = \"w\"} : f32[1,2,8,8]\n  %1 = avg_pool2d %0 {window = [2, 2], stride = [2,2], padding = [0, 0, 0, 0], count_include_pad = false} : f32[1,2,4,4]\n  %2 = pad %1 {low = [0, 0, 1, 1], high = [0, 0, 0, 0], value = -1} : f32[1,2,5,5]\n  %3 = layer_norm %2 {eps = 1e-5} : f32[1,2,5,5]\n  return\n}",
        );
        assert_eq!(
            f.nodes[f.body[1]].op,
            Op::Pool2d {
                kind: PoolKind::Avg,
                window: [2, 2],
                stride: [2, 2],
                padding: [0; 4],
                count_include_pad: false
            }
        );
        assert_eq!(
            f.nodes[f.body[2]].op,
            Op::Pad {
                low: vec![0, 0, 1, 1],
                high: vec![0; 4],
                value: -1.0
            }
        );
        assert_eq!(f.nodes[f.body[3]].op, Op::LayerNorm { eps: 1e-5 });
    }

    #[test]
    fn string_escapes() {
        let name = |lit: &str| {
            let f = parse_one(&format!(
                "func @f {{\n  %0 = input {{name = {lit}}} : f32[]\n  return %0 as {lit}\n}}"
            ));
            assert_eq!(f.outputs[0].name, f.args().next().unwrap().name);
            f.outputs[0].name.clone()
        };
        assert_eq!(name(r#""plain""#), "plain");
        assert_eq!(name(r#""""#), "");
        assert_eq!(name(r#""a\"b""#), "a\"b");
        assert_eq!(name(r#""a\\b""#), "a\\b");
        assert_eq!(name(r#""a\nb\tc""#), "a\nb\tc");
        assert_eq!(name(r#""\u{1}\u{7f}\u{1F600}""#), "\u{1}\u{7f}\u{1F600}");
        assert_eq!(
            name("\"é → 日本 // not a comment\""),
            "é → 日本 // not a comment"
        );
        // And back through the printer's escaping.
        let tricky = "q\"\\\n\t\u{0}\u{1b}é";
        let mut f = Function::new("f");
        let n = f.push_node(
            Op::Input {
                name: tricky.into(),
                ty: TensorType::scalar(DType::F32),
            },
            vec![],
            vec![TensorType::scalar(DType::F32)],
        );
        let v = f.result(n);
        f.outputs.push(Output {
            name: tricky.into(),
            value: v,
        });
        assert_eq!(parse_one(&f.to_string()), f);
    }

    #[test]
    fn multi_result_nodes() {
        let f = parse_one(
            "func @f {\n  %0 = input {name = \"x\"} : f32[6]\n  %1, %2, %3 = split %0 {axis = 0, sizes = [1, 2, 3]} : f32[1], f32[2], f32[3]\n  %4 = concat %3, %1, %2 {axis = 0} : f32[6]\n  return %2 as \"b\", %4 as \"c\"\n}",
        );
        let split = &f.nodes[f.body[1]];
        assert_eq!(split.results.len(), 3);
        for (i, &v) in split.results.iter().enumerate() {
            assert_eq!(f.values[v].result_index, i as u32);
            assert_eq!(f.values[v].def, f.body[1]);
        }
        assert_eq!(f.ty(split.results[2]).shape, vec![3]);
        let concat = &f.nodes[f.body[2]];
        assert_eq!(
            concat.operands,
            vec![split.results[2], split.results[0], split.results[1]]
        );
        assert_eq!(f.outputs[0].value, split.results[1]);
    }

    #[test]
    fn annotations() {
        let node = |ann: &str| {
            let f = parse_one(&format!(
                "func @f {{\n  %0 = input {{name = \"x\"}} : f32[] {ann}\n  return\n}}"
            ));
            let d = &f.nodes[f.body[0]];
            (d.phase, d.stage)
        };
        assert_eq!(node(""), (Phase::Forward, None));
        assert_eq!(node("phase(forward)"), (Phase::Forward, None));
        assert_eq!(node("phase(recompute)"), (Phase::Recompute, None));
        assert_eq!(node("stage(0)"), (Phase::Forward, Some(0)));
        assert_eq!(
            node("phase(optimizer) stage(4294967295)"),
            (Phase::Optimizer, Some(u32::MAX))
        );
        assert_eq!(node("stage(7) phase(offload)"), (Phase::Offload, Some(7)));
        for p in Phase::ALL {
            assert_eq!(node(&format!("phase({})", p.name())).0, p);
        }
    }

    #[test]
    fn types() {
        let ty = |t: &str| {
            let f = parse_one(&format!(
                "func @f {{\n  %0 = input {{name = \"x\"}} : {t}\n  return\n}}"
            ));
            f.ty(f.result(f.body[0])).clone()
        };
        assert_eq!(ty("f32[]"), TensorType::scalar(DType::F32));
        assert_eq!(ty("bf16[0]"), TensorType::new(DType::BF16, vec![0]));
        assert_eq!(
            ty("i64[1,2,3,4,5,6]"),
            TensorType::new(DType::I64, vec![1, 2, 3, 4, 5, 6])
        );
        for d in DType::ALL {
            assert_eq!(ty(&format!("{d}[2]")).dtype, d);
        }
    }

    #[test]
    fn error_display_format() {
        let src = MLP.replace("matmul %0", "matmull %0");
        let e = err(&src);
        assert_eq!((e.line, e.column, e.width), (4, 8, 7));
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("4:8: error: unknown op `matmull`; known ops: abs, add,"),
            "{text}"
        );
        assert!(lines[0].contains("matmul, max"));
        assert_eq!(
            lines[1],
            "  %2 = matmull %0, %1 {transpose_rhs = true} : f32[64,256]"
        );
        assert_eq!(lines[2], "       ^^^^^^^");
        assert_eq!(lines.len(), 3);
        let with_path = e.clone().with_path("m.cir").to_string();
        assert!(with_path.starts_with("m.cir:4:8: error: unknown op"));
        assert_eq!(e.render("m.cir"), with_path);
    }

    #[test]
    fn carets_follow_tabs_and_unicode() {
        let e = err("func @f {\n\t%0 = input {name = \"é\"} : f33[]\n  return\n}");
        assert_eq!((e.line, e.column), (2, 28));
        let text = e.to_string();
        let caret = text.lines().nth(2).unwrap();
        assert!(caret.starts_with('\t'));
        assert_eq!(caret.trim_start(), "^^^");
        assert_eq!(caret.chars().count(), 27 + 3);
    }

    /// (source, line, column, message substring)
    fn check(src: &str, line: usize, column: usize, msg: &str) {
        let e = err(src);
        assert!(
            e.message.contains(msg),
            "message {:?} does not contain {msg:?}\n{e}",
            e.message
        );
        assert_eq!((e.line, e.column), (line, column), "{e}");
    }

    #[test]
    fn expected_found_messages() {
        let src = MLP.replace("add %3, %4", "add %3 %4");
        check(
            &src,
            6,
            15,
            "expected `:` before the result types, found `%4`",
        );
        assert_eq!(
            err(&src).expected.as_deref(),
            Some("`:` before the result types")
        );
        let src = MLP.replace("f32[4]", "f33[4]");
        check(
            &src,
            7,
            54,
            "expected a dtype (f32, f64, f16, bf16, i32, i64, bool), found `f33`",
        );
        let src = MLP.trim_end().trim_end_matches('}');
        let e = err(src);
        assert_eq!(
            e.message,
            "unexpected end of input: expected `}` to close function @mlp"
        );
        assert_eq!((e.line, e.column), (8, 32));
        check(
            "func mlp {",
            1,
            6,
            "expected a function name (`@name`) after `func`, found `mlp`",
        );
        check("func @f (", 1, 9, "expected `{` after `func @f`, found `(`");
        check(
            "fun @f {",
            1,
            1,
            "expected `func` to start a function, found `fun`",
        );
        check(
            "func @f {\n  %0 input",
            2,
            6,
            "expected `=` after the result names, found `input`",
        );
        check(
            "func @f {\n  %0 = 3",
            2,
            8,
            "expected an op name after `=`, found `3`",
        );
        check(
            "func @f {\n  %0 = input {name \"x\"}",
            2,
            20,
            "expected `=` after attribute name `name`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\" : f32[]",
            2,
            26,
            "expected `,` or `}` in the attribute list, found `:`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32",
            2,
            32,
            "unexpected end of input: expected `[` and the dimensions after `f32`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[-1]",
            2,
            33,
            "expected a dimension extent (a non-negative integer), found `-1`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[2 3]",
            2,
            35,
            "expected `,` or `]` in the shape, found `3`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[] phase(back)",
            2,
            41,
            "unknown phase `back`; known phases: forward, dgrad",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[] stage(-1)",
            2,
            41,
            "stage `-1` is not an integer in 0..2^32",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[] stage(4294967296)",
            2,
            41,
            "is not an integer in 0..2^32",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  %1 = neg %0 : f32[]\n}",
            4,
            1,
            "function @f has no `return`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  return %0\n}",
            4,
            1,
            "expected `as` and an output name after %0, found `}`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  return %0 as y\n}",
            3,
            16,
            "expected an output name (a string) after `as`, found `y`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  return %0 as \"y\" %0 as \"z\"\n}",
            3,
            20,
            "expected `,` or `}` to close function @f, found `%0`",
        );
        check(
            "func @f {\n  input",
            2,
            3,
            "expected a node (`%name = op …`) or `return`, found `input`",
        );
        check(
            "func @f {\n",
            1,
            10,
            "unexpected end of input: expected a node or `return` in function @f",
        );
        check(
            "func @f { return } func @g { return } 12",
            1,
            39,
            "expected `func` to start a function, found `12`",
        );
    }

    #[test]
    fn semantic_errors() {
        let src = MLP.replace("matmul %0, %1", "matmul %0, %7");
        check(&src, 4, 19, "use of undefined value %7");
        let src = MLP.replace("matmul %0, %1", "matmul %0, %5");
        check(
            &src,
            4,
            19,
            "value %5 is used before its definition at line 6",
        );
        let src = MLP.replace("matmul %0, %1", "matmul %0, %4");
        check(
            &src,
            4,
            19,
            "value %4 is used before its definition at line 5",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  return %1 as \"y\"\n}",
            3,
            10,
            "use of undefined value %1",
        );
        // A later function's definition does not count.
        check(
            "func @f {\n  %0 = neg %1 : f32[]\n  return\n}\nfunc @g {\n  %1 = input {name = \"x\"} : f32[]\n  return\n}",
            2,
            12,
            "use of undefined value %1",
        );
        // A name used as an operand later does not count as a definition.
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  %1 = neg %2 : f32[]\n  %3 = add %0, %2 : f32[]\n  return\n}",
            3,
            12,
            "use of undefined value %2",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  %1 = add %0, %1 : f32[]\n  return\n}",
            3,
            16,
            "value %1 is used by the node that defines it",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[]\n  %0 = neg %0 : f32[]\n  return\n}",
            3,
            3,
            "redefinition of value %0 (first defined at line 2)",
        );
        check(
            "func @f {\n  %0, %0 = split %0 : f32[]\n  return\n}",
            2,
            7,
            "value %0 is defined twice by the same node",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[4]\n  %1, %2 = split %0 {axis = 0, sizes = [2, 2]} : f32[2]\n  return\n}",
            3,
            3,
            "2 result names but 1 result type is declared",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[], f32[]\n  return\n}",
            2,
            3,
            "1 result name but 2 result types are declared",
        );
        check(
            "func @f { return }\nfunc @g { return }\nfunc @f { return }",
            3,
            6,
            "duplicate function @f (first defined at line 1)",
        );
        let e = err("func @f {\n  %2 = matmull %0, %1 : f32[64,256]\n  return\n}");
        assert!(e.message.starts_with("unknown op `matmull`; known ops: "));
        for name in Op::all_names() {
            assert!(e.message.contains(name));
        }
        // Errors from `op_from_parts` are located at the op name.
        check(
            "func @f {\n  %0 = input {nam = \"x\"} : f32[]\n  return\n}",
            2,
            8,
            "`input` needs attribute `name`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\", axis = 1} : f32[]\n  return\n}",
            2,
            8,
            "`input` has no attribute `axis`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\", name = \"y\"} : f32[]\n  return\n}",
            2,
            27,
            "duplicate attribute `name`",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\"} : f32[1,1,1,1,1,1,1]\n  return\n}",
            2,
            29,
            "rank 7 exceeds the maximum rank 6",
        );
    }

    #[test]
    fn lexical_errors() {
        check(
            "func @f {\n  %0 = input {name = \"x} : f32[]\n}",
            2,
            22,
            "unterminated string literal",
        );
        check(
            "func @f {\n  %0 = input {name = \"x\\q\"} : f32[]\n}",
            2,
            24,
            "unknown escape `\\q`",
        );
        check(
            "func @f {\n  %0 = input {name = \"\\u{d800}\"} : f32[]\n}",
            2,
            23,
            "is not a valid Unicode scalar value",
        );
        check(
            "func @f {\n  %0 = input {name = \"\\u{110000}\"} : f32[]\n}",
            2,
            23,
            "is not a valid Unicode scalar value",
        );
        check(
            "func @f {\n  %0 = input {name = \"\\u41\"} : f32[]\n}",
            2,
            23,
            "expected `{` after `\\u`",
        );
        check(
            "func @f {\n  %0 = input {name = \"\\u{41\"} : f32[]\n}",
            2,
            23,
            "unterminated `\\u{...}` escape",
        );
        check(
            "func @f {\n  % = input",
            2,
            3,
            "expected a value name after `%`",
        );
        check("func @ {", 1, 6, "expected a function name after `@`");
        check(
            "func @f {\n  %0 = constant {value = 12abc}",
            2,
            26,
            "invalid number literal `12abc`",
        );
        check(
            "func @f {\n  %0 = constant {value = 1.5.2}",
            2,
            26,
            "invalid number literal `1.5.2`",
        );
        check(
            "func @f {\n  %0 = constant {value = -x}",
            2,
            26,
            "expected a number or `inf` after `-`",
        );
        check(
            "func @f {\n  %0 = constant {value = 99999999999999999999} : i64[]",
            2,
            26,
            "does not fit in 64 bits",
        );
        check(
            "func @f {\n  %0 = constant {value = 1e999} : f64[]",
            2,
            26,
            "out of range for f64",
        );
        check("func @f {\n  # comment", 2, 3, "unexpected character `#`");
        check("func @f {\n  / comment", 2, 3, "unexpected character `/`");
        check(
            "func @f {\n  %0 = constant {value = [[1]]}",
            2,
            27,
            "nested lists are not supported",
        );
        check(
            "func @f {\n  %0 = constant {value = [\"a\"]}",
            2,
            27,
            "lists of strings are not supported",
        );
        check(
            "func @f {\n  %0 = constant {value = [true, 1]}",
            2,
            33,
            "a list cannot mix booleans and numbers",
        );
        check(
            "func @f {\n  %0 = constant {value = [1 2]}",
            2,
            29,
            "expected `,` or `]` in the list, found `2`",
        );
        check(
            "func @f {\n  %0 = constant {value = maybe}",
            2,
            26,
            "expected an attribute value, found `maybe`",
        );
        // A lexical error after a syntax error is not reached.
        check(
            "func @f {\n  %0 input #",
            2,
            6,
            "expected `=` after the result names",
        );
    }

    #[test]
    fn parse_function_wants_exactly_one() {
        assert!(parse_function("func @f { return }").is_ok());
        let e = parse_function("func @f { return }\nfunc @g { return }").unwrap_err();
        assert!(e
            .message
            .contains("expected end of input after function @f, found `func`"));
        let e = parse_function("").unwrap_err();
        assert_eq!(
            e.message,
            "unexpected end of input: expected `func` to start a function"
        );
        assert_eq!((e.line, e.column), (1, 1));
    }

    #[test]
    fn dropout_seeds_round_trip() {
        for seed in [0, 1, u64::MAX, 1 << 63, 12345] {
            let mut f = Function::new("f");
            let ty = TensorType::new(DType::F32, vec![3]);
            let x = f.push_node(
                Op::Input {
                    name: "x".into(),
                    ty: ty.clone(),
                },
                vec![],
                vec![ty.clone()],
            );
            let xv = f.result(x);
            f.push_node(Op::Dropout { rate: 0.25, seed }, vec![xv], vec![ty]);
            assert_eq!(parse_one(&f.to_string()), f);
        }
    }
}
