// Prompt templates: text with {placeholders} filled from an example's fields.

/** The paper's SQuAD template (Setup: Templates). */
export const SQUAD_TEMPLATE = "{context}\nQuestion: {question}\nAnswer:";
/** The paper's MATH template (Setup: Templates). */
export const MATH_TEMPLATE = "Question: {question}\nAnswer:";
/** Ours, in the same shape: the masked sentence, then a fixed question naming the mask. */
export const CLOZE_TEMPLATE = "{context}\nQuestion: Which word goes in place of {mask}?\nAnswer:";
/** Generic JSONL records already hold the whole prompt. */
export const JSONL_TEMPLATE = "{prompt}";

type Part = { text: string } | { field: string };

/**
 * Splits a template into literal text and {field} placeholders. "{{" and "}}" are literal braces; a
 * lone brace, an empty or malformed placeholder is an error naming the template.
 */
export function parseTemplate(template: string): Part[] {
  if (typeof template !== "string")
    throw new TypeError(`template: expected a string, got ${typeof template}`);
  const parts: Part[] = [];
  let text = "";
  for (let i = 0; i < template.length; i++) {
    const ch = template[i]!;
    if (ch === "{" && template[i + 1] === "{") {
      text += "{";
      i++;
    } else if (ch === "}" && template[i + 1] === "}") {
      text += "}";
      i++;
    } else if (ch === "{") {
      const end = template.indexOf("}", i + 1);
      const name = end < 0 ? "" : template.slice(i + 1, end);
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
        throw new SyntaxError(
          `template: bad placeholder at offset ${i} in ${JSON.stringify(template)} ` +
            `(expected {name}; write {{ and }} for literal braces)`,
        );
      }
      if (text) parts.push({ text });
      text = "";
      parts.push({ field: name });
      i = end;
    } else if (ch === "}") {
      throw new SyntaxError(`template: unmatched "}" at offset ${i} in ${JSON.stringify(template)}`);
    } else {
      text += ch;
    }
  }
  if (text) parts.push({ text });
  return parts;
}

/** The placeholder names a template uses, in order of first use. */
export function templateFields(template: string): string[] {
  const names: string[] = [];
  for (const p of parseTemplate(template)) if ("field" in p && !names.includes(p.field)) names.push(p.field);
  return names;
}

/**
 * Checks that every placeholder of `template` is one of `available` (the fields a task provides), so a
 * typo fails when the task is loaded rather than on some example.
 */
export function checkTemplate(template: string, available: readonly string[], task: string): void {
  for (const f of templateFields(template)) {
    if (!available.includes(f)) {
      throw new RangeError(
        `template: placeholder {${f}} is not a field of ${task} examples (available: ${available.map((a) => `{${a}}`).join(", ")})`,
      );
    }
  }
}

/** Fills a template from `fields`; a missing or non-string field is an error naming it. */
export function fillTemplate(template: string, fields: Readonly<Record<string, unknown>>): string {
  let out = "";
  for (const p of parseTemplate(template)) {
    if ("text" in p) {
      out += p.text;
      continue;
    }
    const v = fields[p.field];
    if (typeof v === "string") out += v;
    else if (typeof v === "number" || typeof v === "boolean") out += String(v);
    else throw new RangeError(`template: no string value for placeholder {${p.field}}`);
  }
  return out;
}

/**
 * The completion as trained: the answer, preceded by a space when the prompt ends in a non-space (the
 * templates end in "Answer:"). Byte-level BPE attaches a leading space to the following word (" Paris"
 * is one token), so this is how the model itself would write the answer after the prompt.
 */
export function completionAfter(prompt: string, answer: string): string {
  if (prompt.length === 0 || /\s$/u.test(prompt) || /^\s/u.test(answer) || answer.length === 0) return answer;
  return ` ${answer}`;
}
