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
use crate::function::{Function, Module, Output, Phase, Value};
use crate::op::Op;
use crate::types::{DType, TensorType, MAX_RANK};

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
    let mut p = Parser::new(src);
    let mut module = Module::new();
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
                module.functions.push(func);
            }
            _ => return Err(p.expected(tok, "`func` to start a function")),
        }
    }
    Ok(module)
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
        let start = start.min(src.len());
        let end = end.clamp(start, src.len());
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
