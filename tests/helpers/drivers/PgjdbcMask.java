// The masking test's reads through pgjdbc: text results from a plain statement, a
// prepared statement executed past prepareThreshold (a named server-side statement
// executed again without a new Describe, integers in the binary format), a result fetched
// two rows at a time (a portal in pieces), CopyManager's COPY out, an expression over a
// masked column (masked whole), and a DO block (refused).
//
// usage: java -cp postgresql.jar:. PgjdbcMask PORT
// Prints every value it received, one result per line, then "done".
import java.io.ByteArrayOutputStream;
import java.sql.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class PgjdbcMask {
    static String row(ResultSet r) throws SQLException {
        StringBuilder b = new StringBuilder();
        for (int i = 1; i <= r.getMetaData().getColumnCount(); i++) {
            if (i > 1) b.append('|');
            b.append(r.getString(i));
        }
        return b.toString();
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?user=postgres"
            + "&ApplicationName=mask_jdbc&prepareThreshold=3";
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT id, email, card, phone, note, age FROM customers ORDER BY id")) {
                while (r.next()) System.out.println("plain " + row(r));
            }
            try (PreparedStatement p = c.prepareStatement("SELECT email, age, note FROM customers WHERE id = ?")) {
                for (int i = 0; i < 8; i++) {
                    p.setInt(1, 1 + i % 4);
                    try (ResultSet r = p.executeQuery()) {
                        while (r.next()) System.out.println("prepared " + row(r));
                    }
                }
            }
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("SELECT id, email, phone FROM customers ORDER BY id")) {
                p.setFetchSize(2);
                try (ResultSet r = p.executeQuery()) {
                    while (r.next()) System.out.println("fetched " + row(r));
                }
            }
            c.commit();
            c.setAutoCommit(true);
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            long n = copy.copyOut("COPY customers TO STDOUT WITH (FORMAT csv)", out);
            System.out.println("copy " + n + " " + out.toString("UTF-8").replace("\n", "\\n"));
            try (Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT lower(email) FROM customers")) {
                while (r.next()) System.out.println("lowered " + row(r));
            }
            try (Statement s = c.createStatement()) {
                s.execute("DO $$ BEGIN PERFORM 1; END $$");
                throw new AssertionError("a DO block was not refused");
            } catch (SQLException e) {
                if (!"42501".equals(e.getSQLState())) throw e;
                System.out.println("refused " + e.getSQLState());
            }
            try (Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT id, note FROM customers ORDER BY id")) {
                while (r.next()) System.out.println("unmasked " + row(r));
            }
        }
        System.out.println("done");
    }
}
