// Safe markdown for model output: the text is never parsed as HTML. Every node is made with
// createElement and filled with textContent, so "<script>" or "<img onerror=...>" shows as text.
"use strict";

function renderInline(text, parent) {
  // `code`, **bold**, *em*, [label](http...) — in that order of precedence, left to right.
  const re = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|\*([^*\n]+)\*|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    let el;
    if (m[1] !== undefined) { el = document.createElement("code"); el.textContent = m[1]; }
    else if (m[2] !== undefined) { el = document.createElement("strong"); el.textContent = m[2]; }
    else if (m[3] !== undefined) { el = document.createElement("em"); el.textContent = m[3]; }
    else {
      el = document.createElement("a");
      el.textContent = m[4];
      el.href = m[5];  // only http(s) URLs match the pattern: no javascript: links
      el.rel = "noopener noreferrer nofollow";
      el.target = "_blank";
    }
    parent.appendChild(el);
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (!para.length) return;
    const p = document.createElement("p");
    para.forEach((l, k) => {
      if (k) p.appendChild(document.createElement("br"));
      renderInline(l, p);
    });
    frag.appendChild(p);
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^```\s*([\w+-]*)/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !lines[i].startsWith("```")) body.push(lines[i++]);
      i++;  // the closing fence (or the end of a still-streaming block)
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[1]) code.dataset.lang = fence[1];
      code.textContent = body.join("\n");
      pre.appendChild(code);
      frag.appendChild(pre);
      continue;
    }
    const item = line.match(/^\s*([-*]|\d+\.)\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*]|\d+\.)\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const li = document.createElement("li");
        renderInline(m[2], li);
        list.appendChild(li);
        i++;
      }
      frag.appendChild(list);
      continue;
    }
    const head = line.match(/^(#{1,4})\s+(.*)$/);
    if (head) {
      flush();
      const h = document.createElement("h" + (head[1].length + 2));
      renderInline(head[2], h);
      frag.appendChild(h);
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
  return frag;
}

window.renderMarkdown = renderMarkdown;
