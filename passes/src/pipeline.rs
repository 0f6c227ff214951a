//! Textual pass pipelines: `a,b{key=value,flag},c`.

use std::collections::BTreeMap;

use crate::pass::{PassError, PassOptions};

/// One entry of a pipeline: a pass name and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineEntry {
    /// Pass name.
    pub name: String,
    /// Its options.
    pub options: PassOptions,
}

impl std::fmt::Display for PipelineEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if !self.options.values.is_empty() {
            let opts: Vec<String> = self
                .options
                .values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "{{{}}}", opts.join(","))?;
        }
        Ok(())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Parses a pipeline string. Whitespace around names, keys and values is ignored.
pub fn parse_pipeline(text: &str) -> Result<Vec<PipelineEntry>, PassError> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut entries = Vec::new();
    let err = |position: usize, message: String| PassError::BadPipeline { position, message };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        let start = i;
        while i < chars.len() && is_name_char(chars[i]) {
            i += 1;
        }
        if start == i {
            return Err(err(
                i,
                match chars.get(i) {
                    None => "expected a pass name, found the end of the pipeline".into(),
                    Some(c) => format!("expected a pass name, found `{c}`"),
                },
            ));
        }
        let name: String = chars[start..i].iter().collect();
        let mut values = BTreeMap::new();
        skip_ws(&mut i);
        if chars.get(i) == Some(&'{') {
            i += 1;
            loop {
                skip_ws(&mut i);
                let ks = i;
                while i < chars.len() && is_name_char(chars[i]) {
                    i += 1;
                }
                if ks == i {
                    return Err(err(
                        i,
                        format!("expected an option name in the options of `{name}`"),
                    ));
                }
                let key: String = chars[ks..i].iter().collect();
                skip_ws(&mut i);
                let value = if chars.get(i) == Some(&'=') {
                    i += 1;
                    let vs = i;
                    let mut depth = 0;
                    while i < chars.len() {
                        match chars[i] {
                            '{' | '[' | '(' => depth += 1,
                            '}' | ']' | ')' if depth > 0 => depth -= 1,
                            ',' | '}' if depth == 0 => break,
                            _ => {}
                        }
                        i += 1;
                    }
                    chars[vs..i].iter().collect::<String>().trim().to_string()
                } else {
                    "true".to_string()
                };
                if values.insert(key.clone(), value).is_some() {
                    return Err(err(
                        ks,
                        format!("option `{key}` of `{name}` is given twice"),
                    ));
                }
                skip_ws(&mut i);
                match chars.get(i) {
                    Some(',') => i += 1,
                    Some('}') => {
                        i += 1;
                        break;
                    }
                    _ => {
                        return Err(err(
                            i,
                            format!("expected `,` or `}}` in the options of `{name}`"),
                        ))
                    }
                }
            }
        }
        entries.push(PipelineEntry {
            options: PassOptions {
                pass: name.clone(),
                values,
            },
            name,
        });
        skip_ws(&mut i);
        match chars.get(i) {
            None => break,
            Some(',') => i += 1,
            Some(c) => return Err(err(i, format!("expected `,` between passes, found `{c}`"))),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_options() {
        let p = parse_pipeline("a, b{x=1, flag ,y=[1,2]},c").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].options.values["x"], "1");
        assert_eq!(p[1].options.values["flag"], "true");
        assert_eq!(p[1].options.values["y"], "[1,2]");
        assert_eq!(p[1].to_string(), "b{flag=true,x=1,y=[1,2]}");
    }

    #[test]
    fn reports_positions() {
        let e = parse_pipeline("a,,b").unwrap_err().to_string();
        assert_eq!(
            e,
            "bad pass pipeline at character 2: expected a pass name, found `,`"
        );
        assert!(parse_pipeline("a{x=1").is_err());
        assert!(parse_pipeline("a b").is_err());
        assert!(parse_pipeline("").is_err());
        assert!(parse_pipeline("a{x=1,x=2}").is_err());
    }
}
