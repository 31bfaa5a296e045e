//! Known machine fetchers of images and links: mailbox providers' proxies
//! that fetch the open pixel whether or not a person reads the message.
//! Their opens are still recorded, marked `machine: true`, so reports can
//! keep them apart.
//!
//! Only user agents are matched. Neither Apple nor Google publishes the
//! address ranges of these proxies, so none are listed here (a guessed
//! range would mislabel real readers).

/// True when `user_agent` is a known mailbox-provider image proxy.
pub fn is_machine(user_agent: Option<&str>) -> bool {
    let Some(ua) = user_agent.map(str::trim) else {
        return false;
    };
    // Gmail fetches every image through its proxy, whose user agent ends in
    // `(via ggpht.com GoogleImageProxy)`.
    ua.contains("GoogleImageProxy")
        // Yahoo Mail's image proxy.
        || ua.contains("YahooMailProxy")
        // Apple Mail Privacy Protection prefetches remote content through
        // Apple's proxies with the bare user agent `Mozilla/5.0`, which no
        // browser or mail client sends on its own.
        || ua == "Mozilla/5.0"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_fetchers() {
        let table = [
            (
                Some(
                    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
                ),
                true,
            ),
            (Some("Mozilla/5.0"), true),
            (
                Some("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"),
                true,
            ),
            (
                Some(
                    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
                ),
                false,
            ),
            (
                Some("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"),
                false,
            ),
            (Some(""), false),
            (None, false),
        ];
        for (ua, want) in table {
            assert_eq!(is_machine(ua), want, "{ua:?}");
        }
    }
}
