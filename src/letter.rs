//! Printable letters for hybrid mail: the item's content, as rendered at submission, laid out
//! on A4 with the sender block, the recipient's address where a DL window envelope shows it
//! (DIN 5008 form B), date and reference, page numbers, and a QR code of the item's public
//! verification link. Fonts (DejaVu Sans, which covers Uzbek Latin oʻ gʻ, Uzbek Cyrillic
//! ў қ ғ ҳ and Russian) are embedded, subset to the characters used.

use std::io::Cursor;

use anyhow::Context;
use printpdf::{Color, IndirectFontRef, Mm, PdfDocument, PdfLayerReference, Rect, Rgb};

use crate::domain::{PostalAddress, REGIONS};

const REGULAR: &[u8] = include_bytes!("../templates/_letter/fonts/DejaVuSans.ttf");
const BOLD: &[u8] = include_bytes!("../templates/_letter/fonts/DejaVuSans-Bold.ttf");

const PAGE_W: f32 = 210.0;
const PAGE_H: f32 = 297.0;
const LEFT: f32 = 25.0;
const RIGHT: f32 = 20.0;
const BOTTOM: f32 = 25.0;
const PT_TO_MM: f32 = 0.352_778;

/// Everything printed on a letter.
#[derive(Debug, Clone)]
pub struct LetterInput {
    pub agency_name: String,
    pub recipient_name: String,
    pub address: PostalAddress,
    pub reference: String,
    /// Already formatted, e.g. `28.11.2026`.
    pub date: String,
    pub subject: String,
    /// The item's content exactly as rendered at submission (HTML fragment).
    pub content_html: String,
    pub item_id: String,
    pub verify_url: String,
}

/// A block of the body: a heading, a label, or a paragraph.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Heading(String),
    Label(String),
    Text { text: String, indent: f32 },
}

/// Turns the content's HTML fragment (h1, h2, p, dl/dt/dd, ul/li) into blocks of plain text.
fn blocks(html: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut rest = html;
    let mut current: Option<(String, String)> = None; // (tag, text)
    while !rest.is_empty() {
        if let Some(start) = rest.find('<') {
            let text = &rest[..start];
            if let Some((_, buf)) = current.as_mut() {
                buf.push_str(text);
            }
            let end = rest[start..].find('>').map(|e| start + e + 1).unwrap_or(rest.len());
            let tag = rest[start + 1..end.saturating_sub(1)].trim().to_ascii_lowercase();
            let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            let closing = tag.starts_with('/');
            if matches!(name.as_str(), "h1" | "h2" | "h3" | "p" | "dt" | "dd" | "li") {
                if closing {
                    if let Some((t, buf)) = current.take() {
                        let text = collapse(&unescape(&buf));
                        if !text.is_empty() {
                            out.push(match t.as_str() {
                                "h1" | "h2" | "h3" => Block::Heading(text),
                                "dt" => Block::Label(text),
                                "dd" => Block::Text { text, indent: 5.0 },
                                "li" => Block::Text { text: format!("• {text}"), indent: 3.0 },
                                _ => Block::Text { text, indent: 0.0 },
                            });
                        }
                    }
                } else {
                    current = Some((name, String::new()));
                }
            } else if name == "br" {
                if let Some((_, buf)) = current.as_mut() {
                    buf.push(' ');
                }
            }
            rest = &rest[end..];
        } else {
            if let Some((_, buf)) = current.as_mut() {
                buf.push_str(rest);
            }
            break;
        }
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&#x2f;", "/")
        .replace("&#x2F;", "/")
        .replace("&amp;", "&")
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Measures text with the font's own advance widths, to wrap lines where they really end.
struct Metrics<'a>(ttf_parser::Face<'a>);

impl Metrics<'_> {
    fn width_mm(&self, text: &str, size_pt: f32) -> f32 {
        let per_unit = size_pt * PT_TO_MM / self.0.units_per_em() as f32;
        text.chars()
            .map(|c| self.0.glyph_index(c).and_then(|g| self.0.glyph_hor_advance(g)).unwrap_or(1000) as f32 * per_unit)
            .sum()
    }

    fn wrap(&self, text: &str, size_pt: f32, width_mm: f32) -> Vec<String> {
        let mut lines = Vec::new();
        let mut line = String::new();
        for word in text.split_whitespace() {
            let candidate = if line.is_empty() { word.to_string() } else { format!("{line} {word}") };
            if self.width_mm(&candidate, size_pt) <= width_mm || line.is_empty() {
                line = candidate;
            } else {
                lines.push(std::mem::replace(&mut line, word.to_string()));
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
        lines
    }
}

/// The address block as the post office reads it.
pub fn address_lines(name: &str, a: &PostalAddress) -> Vec<String> {
    let region = REGIONS.iter().find(|(code, _)| *code == a.region).map(|(_, n)| *n).unwrap_or(&a.region);
    let mut street = format!("{}, {}", a.street, a.house);
    if let Some(apt) = &a.apartment {
        street.push_str(&format!(", {apt}"));
    }
    vec![name.to_string(), street, a.district.clone(), format!("{} {}", a.postcode, region)]
}

/// Renders the letter; returns the PDF's bytes.
pub fn render(input: &LetterInput) -> anyhow::Result<Vec<u8>> {
    let (doc, page, layer) = PdfDocument::new(&input.subject, Mm(PAGE_W), Mm(PAGE_H), "letter");
    let regular = doc.add_external_font_with_subsetting(Cursor::new(REGULAR), true).context("font")?;
    let bold = doc.add_external_font_with_subsetting(Cursor::new(BOLD), true).context("font")?;
    let metrics = Metrics(ttf_parser::Face::parse(REGULAR, 0).context("font metrics")?);
    let bold_metrics = Metrics(ttf_parser::Face::parse(BOLD, 0).context("font metrics")?);
    let text_width = PAGE_W - LEFT - RIGHT;

    let mut layers: Vec<PdfLayerReference> = vec![doc.get_page(page).get_layer(layer)];
    let first = layers[0].clone();

    // Sender block, top left.
    let mut y = PAGE_H - 20.0;
    for line in bold_metrics.wrap(&input.agency_name, 10.0, 110.0) {
        first.use_text(line, 10.0, Mm(LEFT), Mm(y), &bold);
        y -= 4.5;
    }
    first.use_text("Dalil — rasmiy yozishmalar / official correspondence", 7.5, Mm(LEFT), Mm(y), &regular);

    // QR code of the verification link, top right, with the id under it.
    let qr = qrcode::QrCode::with_error_correction_level(input.verify_url.as_bytes(), qrcode::EcLevel::M)
        .context("QR code")?;
    let modules = qr.width();
    let size = 28.0;
    let cell = size / (modules as f32 + 8.0); // 4-module quiet zone each side
    let (qx, qy_top) = (PAGE_W - RIGHT - size, PAGE_H - 12.0);
    first.set_fill_color(Color::Rgb(Rgb::new(0.0, 0.0, 0.0, None)));
    for (i, dark) in qr.to_colors().iter().enumerate() {
        if *dark == qrcode::Color::Dark {
            let (col, row) = ((i % modules) as f32, (i / modules) as f32);
            let x = qx + (col + 4.0) * cell;
            let top = qy_top - (row + 4.0) * cell;
            first.add_rect(Rect::new(Mm(x), Mm(top - cell), Mm(x + cell), Mm(top)));
        }
    }
    first.use_text(input.item_id.clone(), 5.5, Mm(qx - 3.0), Mm(qy_top - size - 2.5), &regular);

    // Recipient's address in the window (DIN 5008 form B: 20 mm from the left, 45–90 mm from the top).
    let mut ay = PAGE_H - 52.0;
    for (i, line) in address_lines(&input.recipient_name, &input.address).into_iter().enumerate() {
        let font = if i == 0 { &bold } else { &regular };
        first.use_text(line, 11.0, Mm(22.0), Mm(ay), font);
        ay -= 5.0;
    }

    // Date and reference, right of the window.
    first.use_text(format!("Sana / Date: {}", input.date), 9.5, Mm(125.0), Mm(PAGE_H - 52.0), &regular);
    first.use_text(format!("Raqam / Ref.: {}", input.reference), 9.5, Mm(125.0), Mm(PAGE_H - 57.0), &regular);

    // Subject and body, flowing over as many pages as needed.
    let mut y = PAGE_H - 105.0;
    let mut page_layer = first.clone();
    let new_page = |layers: &mut Vec<PdfLayerReference>| {
        let (p, l) = doc.add_page(Mm(PAGE_W), Mm(PAGE_H), "letter");
        let layer = doc.get_page(p).get_layer(l);
        layers.push(layer.clone());
        layer
    };
    let put = |text: &str,
               size: f32,
               font: &IndirectFontRef,
               m: &Metrics,
               indent: f32,
               gap: f32,
               y: &mut f32,
               page_layer: &mut PdfLayerReference,
               layers: &mut Vec<PdfLayerReference>| {
        for line in m.wrap(text, size, text_width - indent) {
            if *y < BOTTOM + 10.0 {
                *page_layer = new_page(layers);
                *y = PAGE_H - 25.0;
            }
            page_layer.use_text(line, size, Mm(LEFT + indent), Mm(*y), font);
            *y -= size * PT_TO_MM * 1.45;
        }
        *y -= gap;
    };
    put(&input.subject, 12.0, &bold, &bold_metrics, 0.0, 3.0, &mut y, &mut page_layer, &mut layers);
    for block in blocks(&input.content_html) {
        // Headings and labels keep with what follows: never the last line of a page.
        if matches!(block, Block::Heading(_) | Block::Label(_)) && y < BOTTOM + 10.0 + 12.0 {
            page_layer = new_page(&mut layers);
            y = PAGE_H - 25.0;
        }
        match block {
            Block::Heading(t) => put(&t, 11.0, &bold, &bold_metrics, 0.0, 1.5, &mut y, &mut page_layer, &mut layers),
            Block::Label(t) => put(&t, 9.5, &bold, &bold_metrics, 0.0, 0.3, &mut y, &mut page_layer, &mut layers),
            Block::Text { text, indent } => {
                put(&text, 10.0, &regular, &metrics, indent, 2.0, &mut y, &mut page_layer, &mut layers)
            }
        }
    }

    // Page numbers once the count is known, with the verification link on every page.
    let total = layers.len();
    for (i, layer) in layers.iter().enumerate() {
        let label = format!("{} / {}", i + 1, total);
        let w = metrics.width_mm(&label, 8.0);
        layer.use_text(label, 8.0, Mm(PAGE_W - RIGHT - w), Mm(12.0), &regular);
        layer.use_text(input.verify_url.clone(), 6.5, Mm(LEFT), Mm(12.0), &regular);
    }
    doc.save_to_bytes().context("writing the PDF")
}

/// Arrays and dictionaries nested deeper than this make a PDF unreadable here. lopdf's parser
/// recurses into them without a limit of its own, taking about a kilobyte of stack a level: a
/// file of a few kilobytes with 2,000 nested `[` overflows a 2 MiB thread stack and aborts the
/// whole process. Real documents nest a handful of levels.
pub const MAX_PDF_NESTING: usize = 64;

/// Parses a PDF that comes from outside (an agency's attachment), refusing first, without
/// recursion, one whose arrays or dictionaries nest deeper than [`MAX_PDF_NESTING`].
pub fn load_pdf(data: &[u8]) -> anyhow::Result<lopdf::Document> {
    if !nesting_within(data, MAX_PDF_NESTING) {
        anyhow::bail!("arrays or dictionaries nested more than {MAX_PDF_NESTING} deep");
    }
    lopdf::Document::load_mem(data).context("not a readable PDF")
}

/// Whether no array (`[`) or dictionary (`<<`) in `data` nests deeper than `max`, reading PDF
/// syntax the way a parser would: comments, literal strings (with their escapes and balanced
/// parentheses), hex strings and stream contents hold no structure and are skipped.
fn nesting_within(data: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'%' => {
                while i < data.len() && data[i] != b'\n' && data[i] != b'\r' {
                    i += 1;
                }
            }
            b'(' => {
                let mut open = 1;
                i += 1;
                while i < data.len() && open > 0 {
                    match data[i] {
                        b'\\' => i += 1,
                        b'(' => open += 1,
                        b')' => open -= 1,
                        _ => {}
                    }
                    i += 1;
                }
                continue;
            }
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b'<' if data.get(i + 1) == Some(&b'<') => {
                depth += 1;
                i += 1;
            }
            b'>' if data.get(i + 1) == Some(&b'>') => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'<' => {
                while i < data.len() && data[i] != b'>' {
                    i += 1;
                }
            }
            // The keyword `stream` (not the end of `endstream`, not inside a name): its bytes
            // run to `endstream`.
            b's' if data[i..].starts_with(b"stream")
                && (i == 0 || data[i - 1].is_ascii_whitespace() || data[i - 1] == b'>') =>
            {
                let body = i + b"stream".len();
                match data[body..].windows(b"endstream".len()).position(|w| w == b"endstream") {
                    Some(end) => i = body + end + b"endstream".len(),
                    None => return true,
                }
                continue;
            }
            _ => {}
        }
        if depth > max {
            return false;
        }
        i += 1;
    }
    true
}

/// Appends the pages of PDF attachments after the letter's own, in order. An attachment that is
/// not a readable PDF is an error naming it: a letter is never printed without what it encloses.
pub fn append_pdfs(letter: Vec<u8>, attachments: &[(String, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    use lopdf::{Document, Object, ObjectId};
    if attachments.is_empty() {
        return Ok(letter);
    }
    let mut docs = vec![Document::load_mem(&letter).context("reading the rendered letter")?];
    for (name, bytes) in attachments {
        docs.push(load_pdf(bytes).with_context(|| format!("attachment {name} is not a readable PDF"))?);
    }
    let mut max_id = 1;
    let mut pages: Vec<(ObjectId, Object)> = Vec::new();
    let mut objects = std::collections::BTreeMap::new();
    for mut doc in docs {
        doc.renumber_objects_with(max_id);
        max_id = doc.max_id + 1;
        for (_, id) in doc.get_pages() {
            pages.push((id, doc.get_object(id)?.to_owned()));
        }
        objects.extend(doc.objects);
    }
    let mut merged = Document::with_version("1.5");
    let mut catalog: Option<(ObjectId, Object)> = None;
    let mut root_pages: Option<(ObjectId, lopdf::Dictionary)> = None;
    for (id, object) in &objects {
        match object.type_name().unwrap_or("") {
            "Catalog" => {
                if catalog.is_none() {
                    catalog = Some((*id, object.clone()));
                }
            }
            "Pages" => {
                if root_pages.is_none() {
                    root_pages = Some((*id, object.as_dict()?.clone()));
                }
            }
            "Page" | "Outlines" | "Outline" => {}
            _ => {
                merged.objects.insert(*id, object.clone());
            }
        }
    }
    let (catalog_id, catalog) = catalog.context("the letter has no catalog")?;
    let (pages_id, mut pages_dict) = root_pages.context("the letter has no page tree")?;
    for (id, page) in &pages {
        let mut dict = page.as_dict()?.clone();
        dict.set("Parent", pages_id);
        merged.objects.insert(*id, Object::Dictionary(dict));
    }
    pages_dict.set("Count", pages.len() as u32);
    pages_dict.set("Kids", pages.iter().map(|(id, _)| Object::Reference(*id)).collect::<Vec<_>>());
    merged.objects.insert(pages_id, Object::Dictionary(pages_dict));
    let mut catalog = catalog.as_dict()?.clone();
    catalog.set("Pages", pages_id);
    catalog.remove(b"Outlines");
    merged.objects.insert(catalog_id, Object::Dictionary(catalog));
    merged.trailer.set("Root", catalog_id);
    merged.max_id = merged.objects.len() as u32;
    merged.renumber_objects();
    merged.compress();
    let mut out = Vec::new();
    merged.save_to(&mut out).context("writing the merged PDF")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A readable PDF whose page tree holds an array nested `depth` deep.
    fn nested(depth: usize) -> Vec<u8> {
        let head = "%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n";
        let body = format!(
            "2 0 obj\n<< /Type /Pages /Kids [] /Count 0 /X {}{} >>\nendobj\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let xref = head.len() + body.len();
        let tail = format!(
            "xref\n0 3\n0000000000 65535 f \n{:010} 00000 n \n{:010} 00000 n \ntrailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            9,
            head.len()
        );
        format!("{head}{body}{tail}").into_bytes()
    }

    #[test]
    fn pdfs_nested_too_deep_are_refused_before_the_parser_recurses_into_them() {
        // On a thread with tokio's default stack, where lopdf alone aborts the process at
        // 2,000 levels.
        let outcome = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                assert!(load_pdf(&nested(MAX_PDF_NESTING - 2)).is_ok());
                let deep = load_pdf(&nested(10_000)).unwrap_err();
                assert!(deep.to_string().contains("nested more than 64 deep"), "{deep}");
            })
            .unwrap()
            .join();
        assert!(outcome.is_ok());
        // Counted as a parser reads them: `<<` too; not in strings, comments, hex strings or streams.
        assert!(nesting_within(b"[[<<[]>>]]", 4));
        assert!(!nesting_within(b"[[<<[]>>]]", 3));
        assert!(nesting_within(b"[(([[[\\)[[[) % [[[[\n <5b5b5b> 1 0 obj<</Length 3>>stream\n[[[\nendstream ]", 1));
        assert!(!nesting_within(b"[(\\)) [ ]", 1));
        // A document as they come.
        assert!(load_pdf(include_bytes!("../docs/samples/enclosure.pdf")).is_ok());
    }

    #[test]
    fn the_content_html_becomes_blocks_of_plain_text() {
        let b = blocks("<h1>Chaqiruv qogʻozi</h1>\n<dl><dt>Ish</dt><dd>2-1234&#x2f;2026</dd></dl><p>Sud &lt;zali&gt;\n  3</p><ul><li>Pasport</li></ul>");
        assert_eq!(
            b,
            vec![
                Block::Heading("Chaqiruv qogʻozi".into()),
                Block::Label("Ish".into()),
                Block::Text { text: "2-1234/2026".into(), indent: 5.0 },
                Block::Text { text: "Sud <zali> 3".into(), indent: 0.0 },
                Block::Text { text: "• Pasport".into(), indent: 3.0 },
            ]
        );
    }

    #[test]
    fn lines_wrap_within_the_text_width() {
        let m = Metrics(ttf_parser::Face::parse(REGULAR, 0).unwrap());
        let text = "Суд направляет вам повестку о явке в судебное заседание по гражданскому делу ".repeat(4);
        let lines = m.wrap(&text, 10.0, 165.0);
        assert!(lines.len() > 2);
        assert!(lines.iter().all(|l| m.width_mm(l, 10.0) <= 165.0));
    }

    #[test]
    fn a_letter_renders_to_a_pdf_with_embedded_fonts() {
        let pdf = render(&LetterInput {
            agency_name: "Yunusobod tumanlararo fuqarolik ishlari sudi".into(),
            recipient_name: "Aliyev Aziz".into(),
            address: PostalAddress {
                region: "UZ-TK".into(),
                district: "Yunusobod".into(),
                street: "Amir Temur shoh koʻchasi".into(),
                house: "12".into(),
                apartment: None,
                postcode: "100084".into(),
            },
            reference: "2-1234/2026".into(),
            date: "28.11.2026".into(),
            subject: "Chaqiruv qogʻozi".into(),
            content_html: "<p>Ўзбекистон. Суд. Sudga kelmaslik oqibatlari.</p>".repeat(60),
            item_id: "01a22091-dbc8-706d-adea-59054470d485".into(),
            verify_url: "https://dalil.example/verify/01a22091-dbc8-706d-adea-59054470d485".into(),
        })
        .unwrap();
        assert!(pdf.starts_with(b"%PDF-"));
        assert!(pdf.windows(9).any(|w| w == b"/FontFile"), "fonts are embedded");
        assert!(pdf.len() < 400_000, "subset fonts keep letters small: {} bytes", pdf.len());
        if let Ok(path) = std::env::var("DALIL_WRITE_SAMPLE_LETTER") {
            std::fs::write(path, &pdf).unwrap();
        }
        // Appending a PDF attachment adds its pages after the letter's.
        let letter_pages = lopdf::Document::load_mem(&pdf).unwrap().get_pages().len();
        let merged = append_pdfs(pdf.clone(), &[("enclosure.pdf".into(), pdf.clone())]).unwrap();
        assert_eq!(lopdf::Document::load_mem(&merged).unwrap().get_pages().len(), 2 * letter_pages);
        let err = append_pdfs(pdf, &[("broken.pdf".into(), b"%PDF-1.4 nonsense".to_vec())]).unwrap_err();
        assert!(format!("{err:#}").contains("broken.pdf"));
    }
}
