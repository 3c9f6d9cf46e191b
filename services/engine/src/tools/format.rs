//! How a model writes a tool call, recognized from its chat template as llama.cpp's server
//! does: a template that shows the call syntax it was trained on names the format.

/// The call syntaxes the generator reads and constrains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// Hermes 2 Pro, Qwen 2.5/3: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`.
    Hermes,
    /// Llama 3.x: `{"name": .., "parameters": {..}}` as the whole answer.
    Llama3,
    /// Mistral Nemo and later: `[TOOL_CALLS][{"name": .., "arguments": {..}, "id": ..}]`.
    Mistral,
    /// Any other template that renders tools: the answer is JSON, `{"tool_calls": [..]}` or
    /// `{"response": ".."}`, with an instruction added to the system message.
    Generic,
}

impl ToolFormat {
    /// The format a Jinja template's text shows.
    pub fn detect(template: &str) -> Self {
        if template.contains("<tool_call>") {
            Self::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template.contains("<|start_header_id|>")
            && (template.contains("ipython") || template.contains("\"parameters\""))
        {
            Self::Llama3
        } else {
            Self::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3 => "llama3",
            Self::Mistral => "mistral",
            Self::Generic => "generic",
        }
    }

    /// The text that opens the calls, when the format has one.
    pub(super) fn opener(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some("<tool_call>"),
            Self::Mistral => Some("[TOOL_CALLS]"),
            Self::Llama3 | Self::Generic => None,
        }
    }

    /// The key of a call object that holds its arguments.
    pub(super) fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// The instruction the generic format adds to the system message (what llama.cpp's
    /// generic handler says), naming the JSON shapes the grammar allows.
    pub(crate) fn generic_instruction(required: bool) -> &'static str {
        if required {
            "Respond in JSON format with \"tool_calls\": a list of the tools to call, each \
             {\"name\": ..., \"arguments\": {...}}."
        } else {
            "Respond in JSON format, either with \"tool_calls\" (a list of the tools to call, \
             each {\"name\": ..., \"arguments\": {...}}) or with \"response\" (your reply to \
             the user's request, as a string)."
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_their_format() {
        let qwen = "{%- if tools %}<tools>{{ tool | tojson }}</tools>\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>{%- endif %}";
        assert_eq!(ToolFormat::detect(qwen), ToolFormat::Hermes);
        let mistral =
            "{%- if message.tool_calls %}[TOOL_CALLS][{%- for tc in message.tool_calls %}";
        assert_eq!(ToolFormat::detect(mistral), ToolFormat::Mistral);
        let llama = "<|start_header_id|>ipython<|end_header_id|>{\"name\": function name, \"parameters\": dictionary}";
        assert_eq!(ToolFormat::detect(llama), ToolFormat::Llama3);
        assert_eq!(
            ToolFormat::detect("{{ tools | tojson }}{{ messages }}"),
            ToolFormat::Generic
        );
    }
}
