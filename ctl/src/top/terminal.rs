//! The terminal `top` draws on: raw mode (keys arrive one by one, without
//! echo) and the alternate screen while it runs, and the terminal exactly
//! as it was afterwards, however `top` ends: a return, an error (the
//! daemon went away), a signal the caller turns into a return, or a panic.
//! A shell left in raw mode on the alternate screen looks dead to the user.

use std::{
    io::{self, Write as _},
    sync::Once,
};

use crossterm::{
    cursor::{Hide, MoveTo, Show},
    execute, queue,
    style::{Attribute, Print, SetAttribute},
    terminal::{self, Clear, ClearType, EnterAlternateScreen, LeaveAlternateScreen},
};

use super::view::Line;

/// The terminal in `top`'s hands; dropping it gives the terminal back.
#[derive(Debug)]
pub(super) struct Screen {
    _private: (),
}

impl Screen {
    /// Enters raw mode and the alternate screen, and hides the cursor.
    ///
    /// # Errors
    ///
    /// If the terminal refuses; whatever was already changed is restored.
    pub(super) fn enter() -> io::Result<Screen> {
        restore_on_panic();
        terminal::enable_raw_mode()?;
        // From here on, dropping the screen restores raw mode too.
        let screen = Screen { _private: () };
        execute!(io::stdout(), EnterAlternateScreen, Hide, Clear(ClearType::All))?;
        Ok(screen)
    }

    /// Columns and rows.
    ///
    /// # Errors
    ///
    /// If the terminal cannot say.
    pub(super) fn size() -> io::Result<(usize, usize)> {
        let (columns, rows) = terminal::size()?;
        Ok((usize::from(columns), usize::from(rows)))
    }

    /// Draws `lines` from the top, each cut to `width` (emphasised ones
    /// padded to it, a bar), and clears what is below. Lines are
    /// overwritten in place rather than the screen cleared first, so a
    /// refresh does not flicker.
    ///
    /// # Errors
    ///
    /// If writing to the terminal fails.
    pub(super) fn draw(&mut self, lines: &[Line], width: usize, height: usize) -> io::Result<()> {
        let mut out = io::stdout().lock();
        let shown = lines.len().min(height);
        for (row, line) in lines[..shown].iter().enumerate() {
            let mut text: String = line.text.chars().take(width).collect();
            queue!(out, MoveTo(0, row as u16))?;
            if line.emphasis {
                let padding = width - text.chars().count();
                text.extend(std::iter::repeat_n(' ', padding));
                queue!(out, SetAttribute(Attribute::Reverse), Print(text), SetAttribute(Attribute::Reset))?;
            } else {
                queue!(out, Print(text))?;
            }
            queue!(out, Clear(ClearType::UntilNewLine))?;
        }
        if shown < height {
            queue!(out, MoveTo(0, shown as u16), Clear(ClearType::FromCursorDown))?;
        }
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen, shows the cursor and turns raw mode off.
/// Harmless when they are already so.
fn restore() {
    let _ = execute!(io::stdout(), SetAttribute(Attribute::Reset), Show, LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
}

/// A panic's message is printed by the panic hook, before the stack
/// unwinds to [`Screen`]'s drop: restored only then, the terminal would
/// swallow it (the alternate screen) or garble it (raw mode). So the hook
/// restores the terminal first.
fn restore_on_panic() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
